"""lmforge: a small, reproducible language-model training pipeline."""
