"""Where the evaluate stage's samples start: the data config's own prompts (``data.prompts``), else
the first words of a few validation documents, the same on every run."""

from __future__ import annotations

import shutil

from lmforge.config.compose import compose_config
from lmforge.evaluation.prompts import prompts_from_text, stage_prompts
from tests.helpers import ROOT

SEP = "\x1e"


def test_the_default_corpus_keeps_its_prompts_so_the_default_samples_stay_the_same():
    cfg = compose_config(conf_dir=ROOT / "conf")
    assert stage_prompts(cfg) == ["**ROMEO**\n", "**JULIET**\n", "To be, or not to be"]
    assert "prompts" not in cfg.evaluate  # one place: the data config


def test_a_data_config_without_prompts_takes_them_from_the_validation_text(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "data" / "letters.yaml").write_text("sources: [letters]\nsplit: document\n")
    (conf / "data" / "mine.yaml").write_text("sources: [mine]\nprompts: ['Dear Sir,']\n")
    assert stage_prompts(compose_config(["data=mine"], conf_dir=conf)) == ["Dear Sir,"]
    cfg = compose_config(["data=letters", f"paths.prepared={tmp_path / 'prepared'}"], conf_dir=conf)
    assert cfg.data.prompts is None
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "val.txt").write_text(
        f"My dear Watson, the game is afoot.{SEP}\n  Dear Holmes:\tthank you kindly{SEP}Yes.{SEP}Fourth one here now",
        encoding="utf-8")
    assert stage_prompts(cfg) == ["My dear Watson, the", "Dear Holmes:\tthank you", "Yes."]
    cfg.data.prompts = []
    assert stage_prompts(cfg) == []  # no samples


def test_a_split_by_position_skips_the_paragraph_the_cut_fell_in():
    text = "ing of the end.\n\nKING. Who goes there?\n\n  FOOL. Nuncle, nuncle!\n\nKING. Who goes there?\n\nEDGAR. Tom"
    assert prompts_from_text(text, cut_mid_text=True) == ["KING. Who goes there?", "FOOL. Nuncle, nuncle!",
                                                          "EDGAR. Tom"]
    # Too few paragraphs: lines stand in (the first, cut, line is skipped); never a repeat.
    assert prompts_from_text("ut off here\nOne two three four five\nOne two three four five\nSix",
                             cut_mid_text=True) == ["One two three four", "Six"]
    assert prompts_from_text("") == [] and prompts_from_text(" \n\t\n") == []
