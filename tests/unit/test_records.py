"""Chat and prompt_completion records: parsing hostile lines, reading files, the prepare split, the
packing into rows, the loss flags and the segment-aware forward pass (``lmforge.corpus.records``,
``lmforge.tokenization.packing``, ``GPT.forward(segments=...)``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmforge.corpus import records
from lmforge.corpus.records import BadRecord, RecordStats, parse_record, prepare_records, read_records
from lmforge.errors import LmforgeError
from lmforge.tokenization.packing import LOSS, START, Packer, rows_to_batch
from lmforge.tokenization.shards import ShardWriter
from tests.helpers import tiny_model

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Hello."}]}


def line(value) -> bytes:
    return json.dumps(value).encode()


def test_a_chat_record_is_kept_with_role_and_content_only():
    record = {"messages": [{**m, "name": "x"} for m in CHAT["messages"]], "id": 7}
    assert parse_record(line(record), "chat", "f line 1") == CHAT
    pair = parse_record(line({"prompt": "2+2=", "completion": "4", "extra": 1}), "prompt_completion", "f line 1")
    assert pair == {"prompt": "2+2=", "completion": "4"}


@pytest.mark.parametrize("raw, fmt, says", [
    (b"{not json", "chat", "is not valid JSON"),
    (b"[1, 2]", "chat", "is a JSON list, not an object"),
    (b'"text"', "prompt_completion", "is a JSON str, not an object"),
    (line({"text": "no messages"}), "chat", "has no 'messages' list"),
    (line({"messages": []}), "chat", "has no 'messages' list"),
    (line({"messages": ["hi"]}), "chat", "messages[0] is not an object"),
    (line({"messages": [{"content": "hi"}]}), "chat", "messages[0] has role None"),
    (line({"messages": [{"role": "robot", "content": "hi"}]}), "chat", "has role 'robot'"),
    (line({"messages": [{"role": "user", "content": 3}]}), "chat", "messages[0].content holds int"),
    (line({"messages": [{"role": "user", "content": None}]}), "chat", "content holds nothing"),
    (line({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}), "chat", "holds list"),
    (line({"messages": [{"role": "user", "content": "only a question"}]}), "chat", "no assistant message"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]}), "chat",
     "no assistant message with text"),
    (line({"prompt": "p"}), "prompt_completion", "field 'completion' holds nothing"),
    (line({"prompt": 1, "completion": "c"}), "prompt_completion", "field 'prompt' holds int"),
    (line({"prompt": "p", "completion": ""}), "prompt_completion", "blank completion"),
])
def test_a_bad_record_is_one_sentence_naming_file_and_line(raw, fmt, says):
    with pytest.raises(BadRecord) as err:
        parse_record(raw, fmt, "data/chat.jsonl line 12")
    message = str(err.value)
    assert message.startswith("data/chat.jsonl line 12 ") and says in message
    assert "data.skip_bad_records=true" in message and message.count(".") >= 1 and "\n" not in message


def test_contents_are_cleaned_and_empty_user_content_is_allowed():
    record = parse_record(line({"messages": [{"role": "user", "content": ""},
                                             {"role": "assistant", "content": "a\r\nb\x00c\u0065\u0301"}]}),
                          "chat", "f line 1")
    assert record["messages"][0]["content"] == ""
    assert record["messages"][1]["content"] == "a\nbc\u00e9"  # CRLF, control characters, NFC


def write_lines(path, *lines: bytes, bom: bool = False, crlf: bool = False) -> str:
    end = b"\r\n" if crlf else b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + end.join(lines) + end)
    return path


def test_files_with_bom_crlf_blank_lines_and_no_final_newline_read(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", line(CHAT), b"", b"   ", line(CHAT), bom=True, crlf=True)
    stats = RecordStats()
    assert list(read_records(path, None, "chat", "NFC", False, stats, lambda n: None)) == [CHAT, CHAT]
    assert stats.records_in == 2
    path.write_bytes(line(CHAT) + b"\n" + line(CHAT))  # no newline at the end
    assert len(list(read_records(path, None, "chat", "NFC", False, RecordStats(), lambda n: None))) == 2


def test_bad_lines_stop_the_read_or_are_skipped_and_counted(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", line(CHAT), b"{oops", line({"messages": "x"}), line(CHAT))
    with pytest.raises(BadRecord, match=r"c.jsonl line 2 is not valid JSON"):
        list(read_records(path, None, "chat", "NFC", False, RecordStats(), lambda n: None))
    stats = RecordStats()
    assert len(list(read_records(path, None, "chat", "NFC", True, stats, lambda n: None))) == 2
    assert stats.bad_records == 2 and stats.records_in == 4


def test_a_huge_line_is_refused_by_number_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "BLOCK_BYTES", 1024)
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 4096)
    path = write_lines(tmp_path / "c.jsonl", line(CHAT), b'{"messages": "' + b"x" * 10_000 + b'"}')
    with pytest.raises(LmforgeError, match=r"c.jsonl line 2 is longer than"):
        list(read_records(path, None, "chat", "NFC", True, RecordStats(), lambda n: None))


def data_cfg(**overrides):
    settings = {"format": "chat", "split": "position", "dedupe": True, "skip_bad_records": False, **overrides}
    return OmegaConf.create(settings)


class Bar:
    def update(self, n):
        pass


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


@pytest.mark.parametrize("split", ["position", "document"])
def test_prepare_splits_by_record_deterministically_and_dedupes(tmp_path, split):
    path = write_lines(tmp_path / "c.jsonl", *(line(conversation(i % 40)) for i in range(50)))
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        out.mkdir()
        stats = prepare_records(data_cfg(split=split), [path], [("jsonl", None)], out, 0.2, "NFC", Bar())
        outs.append({name: (out / f"{name}.jsonl").read_bytes() for name in ("train", "val")})
    assert outs[0] == outs[1]
    assert stats.duplicates == 10 and stats.train_records + stats.val_records == 40
    if split == "position":
        assert stats.val_records == 8 and json.loads(outs[0]["val"].splitlines()[0]) == conversation(32)
    assert json.loads((tmp_path / "out0" / "records.json").read_text())["format"] == "chat"


def test_prepare_refuses_parquet_and_an_all_bad_corpus(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", b"{bad", b"[]")
    with pytest.raises(LmforgeError, match="no records were kept .*2 bad"):
        prepare_records(data_cfg(skip_bad_records=True), [path], [("jsonl", None)], tmp_path, 0.2, None, Bar())
    with pytest.raises(LmforgeError, match="is Parquet"):
        prepare_records(data_cfg(), [tmp_path / "x.parquet"], [("parquet", None)], tmp_path, 0.2, None, Bar())


# --- packing ---------------------------------------------------------------------------------


def pack(tmp_path, items, row_tokens=8, overlong="truncate"):
    tokens = ShardWriter(tmp_path / "t", np.dtype(np.uint16), 1 << 20)
    flags = ShardWriter(tmp_path / "f", np.dtype(np.uint8), 1 << 20)
    packer = Packer(tokens, flags, row_tokens, pad_id=0, overlong=overlong)
    for ids, mask in items:
        packer.add(ids, mask)
    counts = packer.finish()
    rows = np.fromfile(tmp_path / "t" / "shard_000000.bin", dtype=np.uint16).reshape(-1, row_tokens)
    row_flags = np.fromfile(tmp_path / "f" / "shard_000000.bin", dtype=np.uint8).reshape(-1, row_tokens)
    return counts, rows, row_flags


def test_records_are_packed_whole_and_padded(tmp_path):
    a = ([1, 2, 3], [False, True, True])
    b = ([4, 5, 6, 7], [False, False, True, True])
    c = ([8, 9], [False, True])
    counts, rows, flags = pack(tmp_path, [a, b, c])
    assert rows.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 0, 0, 0, 0, 0, 0]]
    assert flags.tolist() == [[START, LOSS, LOSS, START, 0, LOSS, LOSS, START], [START, LOSS, START, 0, 0, 0, 0, 0]]
    assert counts == {"records": 3, "rows": 2, "tokens": 9, "loss_tokens": 5, "padding": 7, "overlong": 0,
                      "truncated": 0, "dropped": 0}


def test_overlong_records_are_truncated_or_dropped_and_counted(tmp_path):
    long = (list(range(1, 13)), [False] * 3 + [True] * 9)
    only_late = (list(range(1, 13)), [False] * 10 + [True] * 2)  # its assistant tokens are past the cut
    short = ([1, 2], [False, True])
    counts, rows, _ = pack(tmp_path / "t", [long, only_late, short])
    assert counts["overlong"] == 2 and counts["truncated"] == 2 and counts["dropped"] == 1
    assert rows.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 0, 0, 0, 0, 0, 0]]
    counts, rows, _ = pack(tmp_path / "d", [long, short], overlong="drop")
    assert counts["overlong"] == 1 and counts["dropped"] == 1 and counts["truncated"] == 0 and len(rows) == 1


def test_the_loss_counts_exactly_the_assistant_tokens_of_each_record():
    rows = np.array([[1, 2, 3, 4, 5, 6, 7, 0]])
    flags = np.array([[START, LOSS, LOSS, START, 0, LOSS, LOSS, START]], dtype=np.uint8)
    x, y, segments = rows_to_batch(rows, flags)
    assert x.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    # Targets 2, 3 (record a), 6, 7 (record b); never 4 (b's first token, after a) nor the padding.
    assert y.tolist() == [[2, 3, -100, -100, 6, 7, -100]]
    assert segments.tolist() == [[0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_records_see_and_score_only_themselves(positions):
    model = tiny_model(positions=positions, block_size=16)
    a, b = torch.tensor([[3, 4, 5, 6, 7]]), torch.tensor([[8, 9, 10]])
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 5 + [1] * 3])
    logits, _ = model(packed, segments=segments)
    alone_a, _ = model(a)
    alone_b, _ = model(b)
    torch.testing.assert_close(logits[:, :5], alone_a)
    torch.testing.assert_close(logits[:, 5:], alone_b)
    y = torch.full_like(packed, -100)
    y[0, 6] = 1
    _, loss = model(packed, y, segments=segments)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(alone_b[0, 1:2], torch.tensor([1])))


def test_a_model_without_template_chats_plain_and_refuses_unknown_characters(tmp_path):
    from lmforge.inference.chat import model_chat
    from lmforge.model.directory import load_model_dir
    from tests.helpers import make_model_dir

    chat = model_chat(load_model_dir(make_model_dir(tmp_path / "m")))
    assert chat.name == "plain" and chat.stop == ["\nuser:"]
    ids = chat.prompt_ids([{"role": "user", "content": "good night"}])
    assert chat.encoder.tokenizer.decode(ids) == "user good night\nassistant"  # ':' is not in its alphabet
    with pytest.raises(LmforgeError, match=r"outside the model's vocabulary \('Z'\)"):
        chat.prompt_ids([{"role": "user", "content": "Zed"}])


def test_served_chat_messages_are_refused_over_the_limits_before_and_after_rendering(tmp_path):
    from lmforge.inference.chat import model_chat
    from lmforge.model.directory import load_model_dir
    from lmforge.serving.limits import Limits
    from lmforge.serving.protocol import ApiError, render_chat
    from tests.helpers import make_model_dir

    chat = model_chat(load_model_dir(make_model_dir(tmp_path / "m")))
    say = [{"role": "user", "content": "good night " * 3}]
    ids, name = render_chat(say, chat, Limits(max_prompt_tokens=100, max_prompt_chars=100, max_tokens=8))
    assert name == "plain" and ids == chat.prompt_ids(say)
    with pytest.raises(ApiError, match="33 characters; .* at most 20 .*--max-prompt-chars"):
        render_chat(say, chat, Limits(max_prompt_tokens=100, max_prompt_chars=20, max_tokens=8))
    with pytest.raises(ApiError, match=r"tokens; .* at most 10 .*--max-prompt-tokens"):
        render_chat(say, chat, Limits(max_prompt_tokens=10, max_prompt_chars=100, max_tokens=8))


def test_a_template_that_is_not_incremental_masks_the_reply_content():
    from tokenizers import Tokenizer, models

    from lmforge.tokenization.chat import ChatEncoder, ChatTemplate

    # The generation prompt differs from what a finished turn renders (as with "thinking" templates).
    source = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
              "{% if add_generation_prompt %}[assistant]think:{% endif %}")
    alphabet = sorted(set("[]userasitnkh:Hiyo!"))
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    encoder = ChatEncoder(tokenizer, ChatTemplate(source))
    ids, mask = encoder.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yo!"}])
    assert "".join(alphabet[i] for i, m in zip(ids, mask) if m) == "yo!"


def test_an_opening_assistant_message_counts_without_its_header():
    from tokenizers import Tokenizer, models

    from lmforge.tokenization.chat import CHATML_TOKENS, ChatEncoder, chatml

    alphabet = sorted(set("userasitnHlo!\n")) + list(CHATML_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.add_special_tokens(list(CHATML_TOKENS))
    ids, mask = ChatEncoder(tokenizer, chatml()).encode([{"role": "assistant", "content": "Hello!"},
                                                         {"role": "user", "content": "Hi"}])
    assert "".join(alphabet[i] for i, m in zip(ids, mask) if m) == "Hello!<|im_end|>\n"
