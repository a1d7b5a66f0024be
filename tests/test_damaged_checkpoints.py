"""Every damaged checkpoint is a CheckpointError naming the file and the field (issue 20's table of 69 damaged
checkpoints: the 11 that raised raw exceptions, and their neighbours), in both residencies, for load_moe and
the Runtime alike (both go through load_moe), and mach check refuses the same files it reads."""

import json
import os
import shutil
import struct

import pytest

from mach_runtime import load_moe
from mach_runtime.cli.check import check_checkpoint
from mach_runtime.errors import CheckpointError
from tests.helpers import HF_QWEN3_MOE


def _config(mutate):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        mutate(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return damage


def _header(mutate):
    """Rewrites model.safetensors with ``mutate(header) -> header`` (dict) or raw header bytes; data unchanged."""
    def damage(d):
        f = d / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        new = mutate(json.loads(raw[8:8 + n]))
        new = new if isinstance(new, bytes) else json.dumps(new).encode()
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return damage


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


def _offsets_as_strings(h):
    k = _first_tensor(h)
    h[k]["data_offsets"] = [str(x) for x in h[k]["data_offsets"]]
    return h


def _deeply_nested(h):
    body = json.dumps(h).encode()
    return body[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _overlap(h):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] == h[b]["data_offsets"][1] - h[b]["data_offsets"][0]:
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    else:
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1]
                                - h[b]["data_offsets"][0]]
    return h


def _duplicate_key(h):
    k = _first_tensor(h)
    body = json.dumps(h).encode()
    return body[:-1] + b", " + json.dumps(k).encode() + b": " + json.dumps(h[k]).encode() + b"}"


def _shape_bool(h):
    k = _first_tensor(h)
    h[k]["shape"] = [True] * len(h[k]["shape"])
    return h


def _oversize_header(d):
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 200 << 20) + raw[8:])


def _index(mutate):
    def damage(d):
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "np") as f:
            wm = {k: "model.safetensors" for k in f.keys()}
        mutate(wm)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return damage


def _first_key(wm):
    return sorted(wm)[0]


def _config_dir(d):
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _config_binary(d):
    (d / "config.json").write_bytes(bytes(range(256)) * 4)


def _garbage_tokenizer(d):
    (d / "tokenizer.json").write_bytes(b"\x00\x01not json at all {{{")


def _tokenizer_wrong_json(d):
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))


CASES = {  # name -> (damage, what the message must name)
    "num_attention_heads_0": (_config(lambda c: c.update(num_attention_heads=0)), "num_attention_heads"),
    "num_key_value_heads_0": (_config(lambda c: c.update(num_key_value_heads=0)), "num_key_value_heads"),
    "heads_not_multiple_of_kv": (_config(lambda c: c.update(num_attention_heads=3)), "num_key_value_heads"),
    "decoder_sparse_step_0": (_config(lambda c: c.update(decoder_sparse_step=0)), "decoder_sparse_step"),
    "hidden_size_string": (_config(lambda c: c.update(hidden_size="64")), "hidden_size"),
    "num_experts_float": (_config(lambda c: c.update(
        {("num_local_experts" if "num_local_experts" in c else "num_experts"): 8.0})), "num_experts"),
    "top_k_bool": (_config(lambda c: c.update(num_experts_per_tok=True)), "num_experts_per_tok"),
    "rms_norm_eps_string": (_config(lambda c: c.update(rms_norm_eps="1e-6")), "rms_norm_eps"),
    "mlp_only_layers_not_list": (_config(lambda c: c.update(mlp_only_layers=1)), "mlp_only_layers"),
    "use_cache_int": (_config(lambda c: c.update(use_cache=3)), "use_cache"),  # transformers' strict check
    "attention_bias_string": (_config(lambda c: c.update(attention_bias="no")), "attention_bias"),
    "rope_parameters_string": (_config(lambda c: c.update(rope_parameters="fast")), "rope_parameters"),
    "config_is_directory": (_config_dir, "config.json"),
    "config_is_binary": (_config_binary, "config.json"),
    "config_is_list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    "garbage_tokenizer_json": (_garbage_tokenizer, "tokenizer"),
    "tokenizer_json_wrong_model": (_tokenizer_wrong_json, "tokenizer"),
    "data_offsets_strings": (_header(_offsets_as_strings), "data_offsets"),
    "deeply_nested_header": (_header(_deeply_nested), "nested"),
    "oversize_header": (_oversize_header, "header claims"),
    "overlapping_tensors": (_header(_overlap), "overlap"),
    "duplicate_tensor_name": (_header(_duplicate_key), "duplicate"),
    "shape_of_bools": (_header(_shape_bool), "shape"),
    "entry_missing_dtype": (_header(lambda h: (h[_first_tensor(h)].pop("dtype"), h)[1]), "dtype"),
    "header_not_utf8": (_header(lambda h: b'{"\xff\xfe": 1}  '), "header"),
    "weight_map_int": (_index(lambda wm: wm.__setitem__(_first_key(wm), 5)), "weight_map"),
    "weight_map_escapes_directory": (_index(lambda wm: wm.__setitem__(_first_key(wm), "../model.safetensors")),
                                     "weight_map"),
    "index_not_json": (lambda d: (d / "model.safetensors.index.json").write_bytes(b"\xff\x00"), "index"),
}

# cases mach check sees too (it reads config.json, the safetensors headers and the tokenizer files as JSON, but
# builds no tokenizer; transformers' strict type check of fields mach_runtime does not use runs only when
# transformers loads the tokenizer)
NOT_CHECKED = {"tokenizer_json_wrong_model", "attention_bias_string"}


@pytest.mark.parametrize("residency", ["stacked", "streaming"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path, case, residency):
    damage, names = CASES[case]
    d = tmp_path / "ckpt"
    shutil.copytree(HF_QWEN3_MOE, d)
    damage(d)
    with pytest.raises(CheckpointError) as e:
        model, _, store, _ = load_moe(d, expert_residency=residency)
        store.close()
    assert names in str(e.value), str(e.value)
    assert str(d) in str(e.value) or str(d.resolve()) in str(e.value), str(e.value)  # names the file
    if case not in NOT_CHECKED and residency == "stacked":
        with pytest.raises(CheckpointError):
            check_checkpoint(d, memory_gb=16)


def test_undamaged_copy_loads(tmp_path):
    """The table's baseline: the copy itself loads (so each case fails for its damage alone)."""
    d = tmp_path / "ckpt"
    shutil.copytree(HF_QWEN3_MOE, d)
    _index(lambda wm: None)(d)
    _, _, store, _ = load_moe(d)
    store.close()
    assert os.path.exists(d / "model.safetensors.index.json")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
@pytest.mark.parametrize("residency", ["stacked", "streaming"])
@pytest.mark.parametrize("case", ["data_offsets_strings", "garbage_tokenizer_json", "decoder_sparse_step_0",
                                  "weight_map_int"])
async def test_runtime_open_damaged_checkpoint(tmp_path, case, residency):
    from mach_runtime import Runtime

    damage, names = CASES[case]
    d = tmp_path / "ckpt"
    shutil.copytree(HF_QWEN3_MOE, d)
    damage(d)
    with pytest.raises(CheckpointError, match=names):
        async with Runtime.open(d, expert_residency=residency):
            pass
