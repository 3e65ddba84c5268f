"""DVC stage 'evaluate': python pipelines/evaluate.py [key=value | group=choice ...] (reads params.yaml)."""

from lmforge.stages.runner import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
