"""``linearize push``: publish a converted checkpoint folder to the Hugging Face Hub, with a model card.

The uploaded folder is staged first (hard links where possible, else copies) and validated before
anything touches the network; the upload is one ``upload_folder`` call (one commit), so a failure
leaves nothing partial behind. ``--dry-run OUT`` writes the exact staged folder to ``OUT`` instead.

What is staged: every top-level file of the checkpoint (weights, ``config.json`` with ``auto_map``,
the exported modeling code, tokenizer files, generation config, ``training_summary.json`` and
``eval_report.json`` when present) plus ``README.md``, the model card: YAML metadata
(``base_model``, ``library_name``, ``tags``, ``pipeline_tag``, ``model-index`` from the recovery
report) and sections for usage, conversion settings, training summary and the recovery table.
Subfolders (``eval/``, checkpoints) are not uploaded, except the report chart, staged as
``recovery.png`` when ``eval/report.png`` exists.

The card reads the recovery report's JSON (``eval_report.json``, written by ``linearize eval``); the
file names come from ``linearize.checkpoint_files``, so this module does not import ``linearize/evals/``.
The weights are verified (safetensors headers against file sizes, index shards, config.json)
before anything is staged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .checkpoint_files import (
    CONFIG_FILE, EVAL_CHART, EVAL_REPORT, TRAINING_SUMMARY, WEIGHT_SUFFIX, WEIGHTS_INDEX, verify_checkpoint_files,
)
from .errors import LinearizeError
from .outputs import atomic_folder, check_output_dir

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CHART_FILE = "recovery.png"
DRY_RUN_KIND = "push-dry-run"  # marker kind of a --dry-run folder (linearize.outputs)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TAGS = ("linearize", "linear-attention", "hybrid-attention", "sliding-window-attention", "text-generation")


class HubError(LinearizeError):
    """The hub could not be reached or refused the upload (nothing was uploaded)."""


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove it") from err


def _hub_id(name: str | None) -> str | None:
    """``name`` as a hub repo id, or None if it is a local path or not a valid id."""
    if not name:
        return None
    from .sources.packaged import PACKAGED_MODELS  # the one table of packaged models

    packaged = PACKAGED_MODELS.get(name)
    name = packaged.hub_id if packaged else name
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).expanduser().exists() or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def guess_base_model(checkpoint: Path) -> str | None:
    """The teacher's hub id from the eval report, else the training summary; None if unknown."""
    report = _read_json(checkpoint / EVAL_REPORT) or {}
    summary = _read_json(checkpoint / TRAINING_SUMMARY) or {}
    recipe = summary.get("recipe") if isinstance(summary.get("recipe"), dict) else {}
    for candidate in (report.get("teacher"), summary.get("teacher"), recipe.get("model")):
        if _hub_id(candidate):
            return _hub_id(candidate)
    return None


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _recovery_section(report: dict) -> str:
    s = report.get("settings", {})
    lines = [
        "## Recovery against the teacher",
        "",
        f"lm-eval {report.get('versions', {}).get('lm_eval')}, same settings for both models "
        f"(limit {s.get('limit')}, num_fewshot {s.get('num_fewshot')}); teacher `{report.get('teacher')}`. "
        "Recovery is student/teacher for accuracies and teacher/student for perplexities (1.0 = nothing lost).",
        "",
        "| task | metric | n | teacher | this model | recovery |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report.get("tasks", []):
        arrow = "↑" if r.get("higher_is_better") else "↓"
        lines.append(f"| {r['task']} | {r['metric']} {arrow} | {_fmt(r.get('n'))} | {_fmt(r['teacher'])} | "
                     f"{_fmt(r['student'])} | {_fmt(r.get('recovery'))} |")
    avg = report.get("average") or {}
    if avg:
        lines.append(f"| **average** | ↑ tasks | | {_fmt(avg.get('teacher'))} | {_fmt(avg.get('student'))} | "
                     f"{_fmt(avg.get('recovery'))} |")
    return "\n".join(lines)


def _eval_results(report: dict | None):
    from huggingface_hub import EvalResult

    if not report:
        return None
    results = [
        EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=r["task"],
                   dataset_name=r["task"], metric_type=r["metric"], metric_value=float(r["student"]),
                   metric_name=r["metric"])
        for r in report.get("tasks", []) if r.get("student") is not None
    ]
    return results or None


def build_card(checkpoint: str | Path, repo_id: str, base_model: str | None = None, with_chart: bool = False):
    """The model card (``huggingface_hub.ModelCard``) of a checkpoint folder."""
    from huggingface_hub import ModelCard, ModelCardData

    checkpoint = Path(checkpoint)
    config = _read_json(checkpoint / CONFIG_FILE) or {}
    conversion = config.get("linearize") or {}
    report = _read_json(checkpoint / EVAL_REPORT)
    summary = _read_json(checkpoint / TRAINING_SUMMARY)
    base = _hub_id(base_model) if base_model else guess_base_model(checkpoint)
    if base_model and base is None:
        raise ValueError(f"--base-model {base_model!r} is not a hub repo id like 'org/name'")
    model_name = repo_id.split("/")[-1]
    tags = list(TAGS) + [t for t in (conversion.get("mixer"), config.get("model_type")) if t]
    data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation", tags=tags,
        model_name=model_name, eval_results=_eval_results(report),
    )
    n_layers = config.get("num_hidden_layers")
    kept = conversion.get("keep_softmax_layers") or []
    parts = [
        f"# {model_name}",
        "",
        f"A linearized version of {f'[{base}](https://huggingface.co/{base})' if base else 'its teacher model'}, "
        f"made with linearize: "
        f"{(n_layers - len(kept)) if isinstance(n_layers, int) else 'all'} of {_fmt(n_layers)} attention layers "
        f"replaced by the `{conversion.get('mixer', '?')}` mixer (gated linear recurrence + sliding-window "
        "softmax attention), so prefill is linear in the context and decoding keeps constant memory.",
        "",
        "## Usage",
        "",
        "The modeling code ships in this repository (no extra package needed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "## Conversion settings",
        "",
        "```json",
        json.dumps(conversion, indent=2, sort_keys=True),
        "```",
        "",
    ]
    if summary is not None:
        parts += ["## Training summary", "", "From `training_summary.json`:", "", "```json",
                  json.dumps(summary, indent=2)[:20000], "```", ""]
    else:
        parts += ["## Training", "", "None after conversion (no `training_summary.json`).", ""]
    if report is not None:
        parts += [_recovery_section(report), ""]
        if with_chart:
            parts += [f"![recovery per task]({CHART_FILE})", ""]
    else:
        parts += ["## Evaluation", "", "Not evaluated yet (`linearize eval` writes `eval_report.json`).", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts)
    return ModelCard(content)


# --------------------------------------------------------------------------------------------------
# Staging and validation
# --------------------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_folder(checkpoint: str | Path, out: str | Path, repo_id: str, base_model: str | None = None) -> Path:
    """Write the folder that ``push`` uploads into ``out`` (which must be missing or empty)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pick a new folder for the dry run")
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(checkpoint.iterdir()):
        if src.is_file() and not src.name.startswith(".") and src.name != CARD_FILE:
            _link_or_copy(src, out / src.name)
    with_chart = (checkpoint / EVAL_CHART).is_file() and (checkpoint / EVAL_REPORT).is_file()
    if with_chart:
        _link_or_copy(checkpoint / EVAL_CHART, out / CHART_FILE)
    build_card(checkpoint, repo_id, base_model, with_chart=with_chart).save(out / CARD_FILE)
    return out


_FLAT_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)


def validate_folder(folder: str | Path, load_config: bool = True) -> None:
    """Check that a staged folder is complete and loadable; raise ``LinearizeError`` listing every
    problem. Checks: config.json with ``auto_map`` whose modules (and the flat modules they import)
    exist, safetensors weights (all shards of an index), tokenizer files, a model card whose YAML
    parses, and (``load_config``) that ``AutoConfig`` loads it with ``trust_remote_code``."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    problems: list[str] = []
    config = _read_json(folder / CONFIG_FILE)
    if config is None:
        problems.append("config.json is missing")
        config = {}
    auto_map = config.get("auto_map") or {}
    for key in ("AutoConfig", "AutoModelForCausalLM"):
        if key not in auto_map:
            problems.append(f"config.json auto_map has no {key}")
    py_files = {p.stem for p in folder.glob("*.py")}
    for target in auto_map.values():
        module = str(target).split("--")[-1].rsplit(".", 1)[0]
        if module not in py_files:
            problems.append(f"auto_map names {target} but {module}.py is missing")
    for py in folder.glob("*.py"):
        for a, b in _FLAT_IMPORT.findall(py.read_text(encoding="utf-8")):
            name = (a or b).split(".")[0]
            if name.startswith("linearize_") and name not in py_files:
                problems.append(f"{py.name} imports {name} but {name}.py is missing")
    index = _read_json(folder / WEIGHTS_INDEX)
    if index is not None:
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                problems.append(f"weight shard {shard} (from the index) is missing")
    elif not any(p.suffix == WEIGHT_SUFFIX for p in folder.iterdir()):
        problems.append("no .safetensors weights")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not (folder / CARD_FILE).is_file():
        problems.append(f"{CARD_FILE} (model card) is missing")
    else:
        try:
            card = ModelCard.load(folder / CARD_FILE)
            if card.data.library_name != "transformers":
                problems.append("model card metadata lacks library_name: transformers")
        except Exception as err:  # noqa: BLE001 - any parse failure is reported, with its message
            problems.append(f"model card YAML does not parse: {err}")
    if load_config and not problems:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(folder, trust_remote_code=True)
        except Exception as err:  # noqa: BLE001 - reported as a validation problem with its cause
            problems.append(f"AutoConfig.from_pretrained(trust_remote_code=True) fails: {err}")
    if problems:
        raise LinearizeError(f"{folder} is not ready to upload:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------


def _hub_api(token: str | None, endpoint: str | None):
    """An authenticated ``HfApi`` after checking the token against the hub (no upload yet)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN; nothing was uploaded")
    api = HfApi(token=token, endpoint=endpoint)
    try:
        api.whoami()
    except OfflineModeIsEnabled as err:
        raise HubError("the hub is switched off here (HF_HUB_OFFLINE=1); nothing was uploaded") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"the hub rejected the token (HTTP {status}); log in again; nothing was uploaded") from err
        raise HubError(f"the hub answered with an error ({err}); nothing was uploaded") from err
    except OSError as err:
        raise HubError(f"the hub is unreachable ({err}); nothing was uploaded") from err
    except Exception as err:  # httpx/requests transport errors differ between huggingface_hub versions
        if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise HubError(f"the hub is unreachable ({type(err).__name__}: {err}); nothing was uploaded") from err
        raise
    return api


def push(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: str | Path | None = None,
    base_model: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    overwrite: bool = False,
) -> str:
    """Upload ``checkpoint`` to ``repo_id`` (or, with ``dry_run``, write the staged folder there).

    Returns the commit URL, or the dry-run folder. Everything is validated before any network call:
    first the weights on disk (:func:`linearize.checkpoint_files.verify_checkpoint_files`) and the
    dry-run folder (the output policy of ``linearize.outputs``: new, empty, or an earlier dry run of
    ours replaced only with ``overwrite``), then the staged folder (:func:`validate_folder`).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo id {repo_id!r} is not valid: use 'user/name' ({err})") from err
    if "/" not in repo_id:
        raise ValueError(f"repo id {repo_id!r} needs a namespace: 'user/name' or 'org/name'")
    if dry_run is not None:
        out = check_output_dir(dry_run, what="dry-run folder", overwrite=overwrite, sources=[checkpoint],
                               flag="--dry-run")
    verify_checkpoint_files(checkpoint)
    if dry_run is not None:
        with atomic_folder(out, kind=DRY_RUN_KIND, overwrite=overwrite) as tmp:
            validate_folder(stage_folder(checkpoint, tmp, repo_id, base_model))
        logger.info("dry run: the folder that would be uploaded to %s is %s", repo_id, out)
        return str(out)
    with tempfile.TemporaryDirectory(prefix="linearize-push-") as tmp:
        staged = stage_folder(checkpoint, Path(tmp) / "upload", repo_id, base_model)
        validate_folder(staged)
        api = _hub_api(token, endpoint)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staged, revision=revision, repo_type="model",
                commit_message=commit_message or f"Upload {Path(checkpoint).name} with linearize",
            )
        except Exception as err:
            raise HubError(f"upload to {repo_id} failed ({type(err).__name__}: {err}); the files go up as one "
                           "commit, so none of them was committed") from err
    logger.info("uploaded %s to %s", checkpoint, commit)
    return str(commit)
