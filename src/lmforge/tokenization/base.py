"""The base model of a fine-tune (``finetune.base``) as the vocab stage meets it: where it is, which
exact files, and its tokenizer adopted into the vocabulary directory.

A base is named three ways:

* an lmforge model directory (trained here, or ``lmforge import``-ed);
* a local ``transformers`` directory of the GPT-2 or Llama family (``lmforge.interop.hf`` reads it);
* a Hugging Face Hub id ``org/name`` (with ``finetune.revision``: a branch, tag or commit), fetched
  with ``huggingface_hub.snapshot_download`` into its own cache (``HF_HUB_CACHE``, or
  ``HF_HOME/hub``); ``HF_HUB_OFFLINE=1`` reads the cache only.

``resolve_base`` turns the name into a ``Base``: a local directory, the commit it came from (Hub
ids) and the sha256 of every file the fine-tune reads, which ``record()`` writes as ``base.json``
into the vocabulary directory (the vocab stage), into the model directory and into the MLflow
lineage tags. Later stages resolve the name again and ``check_same`` refuses a base whose files
changed since the vocab stage adopted its tokenizer. Its network (as our ``GPT``) is
``lmforge.interop.base``'s: this module imports no model, so the vocab stage needs none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config.paths import BASE_FILE, TOKENIZER_FILE
from lmforge.errors import LmforgeError

LMFORGE, TRANSFORMERS = "lmforge", "transformers"
LOCAL, HUB = "local", "hub"
# What a fine-tune reads of a transformers directory (and so what is fetched from the Hub and hashed).
HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HUB_PATTERNS = [*HF_FILES, "*.safetensors"]
LMFORGE_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Base:
    """A resolved base: ``path`` (a local directory), ``kind`` (lmforge or transformers),
    ``source`` (local or hub), ``revision`` (the Hub commit; None for a local directory) and
    ``files`` (relative path -> sha256)."""

    ref: str
    path: Path
    kind: str
    source: str
    revision: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        """What ``base.json`` holds: enough to name, fetch again and verify this base."""
        return {"ref": self.ref, "kind": self.kind, "source": self.source, "revision": self.revision,
                "files": self.files}

    def tags(self) -> dict[str, str]:
        """The MLflow lineage tags of this base (``lmforge.base.*``)."""
        digest = hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()
        tags = {"lmforge.base.ref": self.ref, "lmforge.base.kind": self.kind, "lmforge.base.source": self.source,
                "lmforge.base.files_sha256": digest}
        if self.revision:
            tags["lmforge.base.revision"] = self.revision
        return tags


BASE_TAG_KEYS = ("lmforge.base.ref", "lmforge.base.kind", "lmforge.base.source", "lmforge.base.files_sha256",
                 "lmforge.base.revision")


def base_setting(cfg) -> tuple[str | None, str | None]:
    """``(finetune.base, finetune.revision)`` of ``cfg``; (None, None) when it fine-tunes nothing."""
    finetune = cfg.get("finetune") if hasattr(cfg, "get") else None
    if not finetune or not finetune.get("base"):
        return None, None
    revision = finetune.get("revision")
    return str(finetune.base), (str(revision) if revision not in (None, "") else None)


def resolve_base(ref: str | os.PathLike, revision: str | None = None) -> Base:
    """The local directory, kind, revision and file hashes of the base named ``ref``.

    An existing directory is taken as it is (``finetune.revision`` must then be null); a name of
    the form ``org/name`` that is not a directory is a Hub id. LmforgeError, one sentence, for a
    path that does not exist, a directory that is no model, and a Hub id that cannot be fetched
    (offline and not cached, unknown repository or revision).
    """
    ref = str(ref)
    if not ref.strip():
        raise LmforgeError("finetune.base is empty; name a model directory, a local transformers directory or a "
                           "Hub id (or null to train from scratch).")
    path = Path(ref).expanduser()
    if path.is_dir():
        if revision:
            raise LmforgeError(f"finetune.revision={revision} applies only to Hub ids, but finetune.base={ref} is a "
                               "local directory; set finetune.revision=null (or name the base by its Hub id).")
        kind = directory_kind(path)
        return Base(ref, path, kind, LOCAL, None, file_hashes(path, kind))
    if path.exists():
        raise LmforgeError(f"finetune.base={ref} is a file, not a directory; name a model directory, a transformers "
                           "directory or a Hub id (org/name).")
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise LmforgeError(f"finetune.base={ref} does not exist; name a model directory, a local transformers "
                           "directory or a Hub id such as HuggingFaceTB/SmolLM2-135M.")
    snapshot = _download(ref, revision)
    kind = directory_kind(snapshot, ref)
    return Base(ref, snapshot, kind, HUB, snapshot.name, file_hashes(snapshot, kind))


def directory_kind(path: Path, shown: str | None = None) -> str:
    """``lmforge`` or ``transformers``: what ``path``'s config.json says it is."""
    shown = shown or str(path)
    config = path / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"finetune.base={shown} has no config.json, so it is neither an lmforge model directory "
                           "nor a transformers model; point finetune.base at one.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{config} is not valid JSON ({err}); re-download or re-save the base model.") from None
    if isinstance(data, dict) and data.get("format") == LMFORGE:
        return LMFORGE
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
        return TRANSFORMERS
    raise LmforgeError(f"{config} names no model_type, so finetune.base={shown} is not a transformers model "
                       "directory; point finetune.base at one.")


def file_hashes(path: Path, kind: str) -> dict[str, str]:
    """sha256 of each file of ``path`` that a fine-tune reads (weights, configs, tokenizer)."""
    names = LMFORGE_FILES if kind == LMFORGE else sorted({*HF_FILES, *(p.name for p in path.glob("*.safetensors"))})
    return {name: _sha256(path / name) for name in names if (path / name).is_file()}


def check_same(base: Base, recorded: dict, where: Path) -> None:
    """LmforgeError unless ``base`` has the files ``recorded`` (a ``base.json`` read from ``where``)."""
    if recorded.get("ref") != base.ref or recorded.get("files") != base.files:
        what = "another base" if recorded.get("ref") != base.ref else "files that have changed since"
        raise LmforgeError(f"finetune.base={base.ref} has {what} {where} was written (by the vocab stage); "
                           "rerun the pipeline from the vocab stage (dvc repro, or lmforge vocab) so that "
                           "the tokens and the weights come from the same base.")


def read_record(directory: str | Path) -> dict | None:
    """The ``base.json`` of a vocabulary or model directory, or None when it has none."""
    path = Path(directory) / BASE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{path} is not valid JSON ({err}); rerun the vocab stage to write it again.") from None
    return record if isinstance(record, dict) else None


def resolve_recorded(directory: str | Path) -> tuple[Base, dict] | None:
    """The base that ``directory/base.json`` names, fetched at its recorded revision and verified."""
    record = read_record(directory)
    if record is None:
        return None
    base = resolve_base(record["ref"], record.get("revision") if record.get("source") == HUB else None)
    check_same(base, record, Path(directory) / BASE_FILE)
    return base, record


def base_eot_token(base: Base) -> tuple[str, int, str]:
    """The base's end-of-text token, its id and the tokenizer kind the model directory records."""
    from lmforge.tokenization.tokenizer import hf_eos_token, load_tokenizer

    config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    tokenizer_path = base.path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise LmforgeError(f"{tokenizer_path} is missing; save the base's fast tokenizer with "
                           "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR), or name another base.")
    if base.kind == LMFORGE:
        meta = config.get("tokenizer") or {}
        return str(meta.get("eot_token")), int(meta.get("eot_id", -1)), str(meta.get("kind", "imported"))
    token, token_id = hf_eos_token(base.path, config, load_tokenizer(tokenizer_path))
    return token, token_id, "imported"


def adopt_tokenizer(base: Base, vocab_dir: str | Path) -> None:
    """Write the base's tokenizer into ``vocab_dir`` (the vocab stage's output) with its
    ``tokenizer_config.json`` (where its chat template is) and ``base.json`` (the record and the
    end-of-text token)."""
    from lmforge.outputs import atomic_path, write_json

    eot_token, eot_id, kind = base_eot_token(base)
    vocab_dir = Path(vocab_dir)
    vocab_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(vocab_dir / TOKENIZER_FILE) as tmp:
        shutil.copyfile(base.path / TOKENIZER_FILE, tmp)
    if (base.path / TOKENIZER_CONFIG).is_file():
        with atomic_path(vocab_dir / TOKENIZER_CONFIG) as tmp:
            shutil.copyfile(base.path / TOKENIZER_CONFIG, tmp)
    else:
        (vocab_dir / TOKENIZER_CONFIG).unlink(missing_ok=True)
    write_json(vocab_dir / BASE_FILE, {**base.record(), "eot_token": eot_token, "eot_id": eot_id,
                                       "tokenizer_kind": kind})


# --- Fetching from the Hub ----------------------------------------------------------------------


def hub_cache_dir() -> str | None:
    """The Hub cache this process uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the library's
    default (None). Read on each call: huggingface_hub reads them once, when it is imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def cached_hub_file(repo_id: str, revision: str | None, filename: str) -> Path | None:
    """``filename`` of the Hub repository ``repo_id`` at ``revision`` when the cache holds it, else None
    (nothing is fetched: ``lmforge check`` reads a cached base's config this way)."""
    if not _HUB_ID.match(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - tokenizers depends on huggingface_hub
        raise LmforgeError("finetune.base names a Hub id, which needs huggingface_hub: "
                           "pip install huggingface_hub (or give a local directory).") from None
    at = f" at revision {revision}" if revision else ""
    offline = hub_offline()
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                 allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except hub_errors.RevisionNotFoundError:
        raise LmforgeError(f"finetune.revision={revision} is not a branch, tag or commit of {repo_id} on the "
                           "Hub; fix finetune.revision (null means main).") from None
    except hub_errors.GatedRepoError:
        raise LmforgeError(f"finetune.base={repo_id} is a gated repository; accept its licence on the Hub and log "
                           "in (hf auth login), or download it and name the local directory.") from None
    except hub_errors.RepositoryNotFoundError:
        raise LmforgeError(f"finetune.base={repo_id} is not a model repository on the Hub (or it is private); "
                           "check the id, or log in (hf auth login).") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, FileNotFoundError):
        how = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise LmforgeError(f"finetune.base={repo_id}{at} is not in the Hub cache ({hub_cache_dir() or 'the default'})"
                           f" and {how}; download it once online (hf download {repo_id}), or name a local "
                           "directory.") from None
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmforgeError(f"cannot fetch finetune.base={repo_id}{at} from the Hub ({reason}); "
                           "check the id and the network, or name a local directory.") from None
    return Path(path)


def _sha256(path: Path) -> str:
    # In the Hub cache a large (LFS) file is a link to a blob named by its own sha256: no need to read it.
    if path.is_symlink():
        target = Path(os.readlink(path)).name
        if _SHA256.match(target):
            return target
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
