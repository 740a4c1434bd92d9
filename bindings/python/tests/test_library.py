"""Loading, the version check, configuration handles, error translation, struct layouts."""

import json
import os
import re
import subprocess
import sys

import pytest

import calibrl
from calibrl import _abi, _lib
from conftest import REPO


def test_loaded_library_and_version_check():
    lib = _lib.lib()
    assert lib.path.name == "libcalibrl.so"
    assert calibrl.library_version() == "0.1.0"
    assert lib.functions["calibrl_abi_version"]() == _abi.EXPECTED_ABI_VERSION


def test_abi_mismatch_is_refused(monkeypatch):
    found = _abi.EXPECTED_ABI_VERSION
    monkeypatch.setattr(_lib, "EXPECTED_ABI_VERSION", found + 1)
    with pytest.raises(calibrl.AbiMismatchError, match=f"ABI version {found}"):
        _lib._Library(_lib.lib().path)


def test_missing_library_names_the_path_and_the_fix(tmp_path):
    code = "import calibrl; calibrl.Config()"
    env = {"CALIBRL_LIBRARY": str(tmp_path / "nope.so"), "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # running against a source tree
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode != 0
    assert "LibraryNotFoundError" in out.stderr and "nope.so" in out.stderr
    assert "pip install ./bindings/python" in out.stderr


def test_every_declared_signature_is_bound_or_reported_missing():
    lib = _lib.lib()
    for name in _lib._SIGNATURES:
        assert (name in lib.functions) != (name in lib.missing), name
    # The exports of the crate foundation are always there.
    for name in ["calibrl_config_new", "calibrl_logits_forward", "calibrl_logits_backward",
                 "calibrl_logits_forward_backward",
                 "calibrl_logits_shard_stats", "calibrl_logits_shard_finish"]:
        assert name in lib.functions


def test_calling_a_missing_export_raises_a_clear_error(monkeypatch):
    lib = _lib.lib()
    monkeypatch.delitem(lib.functions, "calibrl_logits_forward")
    with pytest.raises(calibrl.MissingSymbolError, match="calibrl_logits_forward"):
        _lib.function("calibrl_logits_forward")


def test_config_presets_and_overrides():
    paper = calibrl.Config().to_dict()
    assert (paper["delta_mode"], paper["alpha"], paper["lambda"], paper["dual_clip"]) == ("sequence", 0.5, 0.1, 3.0)
    assert calibrl.Config("reference").to_dict()["delta_mode"] == "token_aligned"
    g = calibrl.Config("grpo").to_dict()
    assert (g["loss"], g["lambda"]) == ("grpo", 0.0)
    c = calibrl.Config("reference", alpha=0.3, **{"lambda": 0.2}, kl_kind="low_var_kl")
    d = c.to_dict()
    assert (d["alpha"], d["lambda"], d["kl_kind"], d["delta_mode"]) == (0.3, 0.2, "k3", "token_aligned")
    assert calibrl.Config.from_dict(d).to_dict() == d
    assert c.replace(alpha=0.8)["alpha"] == 0.8
    assert calibrl.Config.coerce({"preset": "grpo"}).to_dict() == g


@pytest.mark.parametrize(
    "kwargs, key",
    [({"lamda": 0.1}, "lamda"), ({"alpha": 1.5}, "alpha"), ({"activation": "gelu"}, "activation"),
     ({"agg": "seq-mean-token-sum-norm"}, "t_norm"), ({"lambda": "0.1"}, "lambda")],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(calibrl.ConfigError) as e:
        calibrl.Config(**kwargs)
    assert f"`{key}`" in str(e.value)
    assert e.value.status == 7 and e.value.status_name == "CALIBRL_STATUS_INVALID_CONFIG"
    assert isinstance(e.value, ValueError)
    with pytest.raises(calibrl.ConfigError, match="preset"):
        calibrl.Config("ppo")


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)


def _header_structs(text: str) -> dict:
    """{struct name: [(C type, field name), ...]} of the header's structs."""
    structs = {}
    for m in re.finditer(r"(?:typedef )?struct (\w+) \{(.*?)\}", _strip_comments(text), re.S):
        fields = re.findall(r"([\w\s\*]+?)\s*\b(\w+)\s*;", m.group(2))
        structs.setdefault(m.group(1), [(" ".join(t.split()), n) for t, n in fields])
    return structs


def _header_functions(text: str) -> dict:
    """{function name: (return type, [parameter types])} of the header's prototypes."""
    out = {}
    text = re.sub(r"^\s*#.*$", "", _strip_comments(text), flags=re.M)  # preprocessor lines
    for m in re.finditer(r"([\w\s\*]+?)\b(calibrl_\w+)\(([^)]*)\);", text):
        params = [p.strip() for p in m.group(3).split(",") if p.strip() not in ("", "void")]
        # Drop the parameter name: "const struct calibrl_plan *plan" -> "const struct calibrl_plan *".
        types = [" ".join(re.sub(r"\w+$", "", p).split()) for p in params]
        out[m.group(2)] = (" ".join(m.group(1).split()), types)
    return out


def _ctype_matches(c_type: str, py_type) -> bool:
    import ctypes

    if c_type.endswith("*"):
        return py_type is ctypes.c_void_p or hasattr(py_type, "_type_") and py_type.__name__.startswith("LP_")
    return {
        "double": ctypes.c_double,
        "int64_t": ctypes.c_int64,
        "int32_t": ctypes.c_int32,
        "uint8_t": ctypes.c_uint8,
        "uint16_t": ctypes.c_uint16,
        "uint32_t": ctypes.c_uint32,
        "uint64_t": ctypes.c_uint64,
        "DLDevice": _abi.DLDevice,
        "DLDataType": _abi.DLDataType,
        "struct calibrl_normalizers": _abi.Normalizers,
    }.get(c_type) is py_type


# Opaque handles and typedefs that the bindings pass as void pointers.
_OPAQUE = {"calibrl_config", "calibrl_plan"}


def _param_matches(c_type: str, py_type, structs: dict) -> bool:
    """Whether a ctypes argument/return type is exactly the C type of the header (pointers
    included: ``uint32_t *`` must be ``POINTER(c_uint32)``, ``struct calibrl_plan **``
    ``POINTER(c_void_p)``)."""
    import ctypes

    words = [w for w in c_type.replace("*", " * ").split() if w not in ("const", "struct", "enum")]
    stars = words.count("*")
    base = " ".join(w for w in words if w != "*")
    if stars == 0:
        return {
            "void": None,
            "bool": ctypes.c_bool,
            "double": ctypes.c_double,
            "int64_t": ctypes.c_int64,
            "int32_t": ctypes.c_int32,
            "uint8_t": ctypes.c_uint8,
            "uint32_t": ctypes.c_uint32,
            "uint64_t": ctypes.c_uint64,
            "size_t": ctypes.c_size_t,
            "calibrl_status": ctypes.c_int32,
            "calibrl_stream": ctypes.c_void_p,
        }.get(base, "?") is py_type
    if stars == 1 and base == "char":
        return py_type is ctypes.c_char_p
    if stars == 1 and (base in _OPAQUE or base == "void"):
        return py_type is ctypes.c_void_p
    pointee = getattr(py_type, "_type_", None)
    if not (isinstance(pointee, type) and py_type.__name__.startswith("LP_")):
        return False
    inner = base + " *" * (stars - 1)
    if stars == 1 and base in structs:
        return pointee is structs[base]
    return _param_matches(inner, pointee, structs)


HEADER = REPO / "include" / "calibrl.h"


@pytest.mark.skipif(not HEADER.exists(), reason="include/calibrl.h is not in this checkout")
def test_ctypes_declarations_match_the_header():
    text = HEADER.read_text()
    structs = _header_structs(text)
    ours = {
        "DLTensor": _abi.DLTensor,
        "calibrl_normalizers": _abi.Normalizers,
        "calibrl_metrics": _abi.Metrics,
        "calibrl_advantage_args": _abi.AdvantageArgs,
        "calibrl_loss_args": _abi.LossArgs,
        "calibrl_linear_input": _abi.LinearInput,
        "calibrl_scheduler_config": _abi.SchedulerConfigC,
        "calibrl_prompt_desc": _abi.PromptDesc,
        "calibrl_plan_info": _abi.PlanInfo,
        "calibrl_minibatch_info": _abi.MinibatchInfo,
        "calibrl_seq_info": _abi.SeqInfo,
    }
    for cname, cls in ours.items():
        if cname not in structs:
            assert cname == "DLTensor", f"{cname} is not in the header"
            continue
        assert [n for _, n in structs[cname]] == [f[0] for f in cls._fields_], cname
        for (c_type, name), (_, py_type) in zip(structs[cname], cls._fields_):
            assert _ctype_matches(c_type, py_type), f"{cname}.{name}: {c_type} vs {py_type}"
    # Every struct of the header that a function takes has its ctypes twin above.
    assert set(structs) <= set(ours), f"header structs without a ctypes class: {set(structs) - set(ours)}"
    functions = _header_functions(text)
    for name, (restype, argtypes) in _lib._SIGNATURES.items():
        assert name in functions, f"{name} is declared in _lib but not in the header"
        c_ret, c_params = functions[name]
        assert len(c_params) == len(argtypes), name
        assert ("calibrl_status" in c_ret) == (name in _lib._CHECKED), name
        assert _param_matches(c_ret, restype, ours), f"{name} returns {c_ret}, ctypes says {restype}"
        for i, (c_type, py_type) in enumerate(zip(c_params, argtypes)):
            assert _param_matches(c_type, py_type, ours), f"{name} parameter {i}: {c_type} vs {py_type}"
    # Every export of the header has a Python signature (no exceptions).
    missing = set(functions) - set(_lib._SIGNATURES)
    assert not missing, f"header functions without a Python signature: {sorted(missing)}"
    assert f"#define CALIBRL_ABI_VERSION {_abi.EXPECTED_ABI_VERSION}" in text
    assert f"#define CALIBRL_METRICS_LEN {_abi.METRICS_LEN}" in text


def test_param_matcher_refuses_wrong_pointer_types():
    """The header check above is only as good as its matcher: it must tell these apart."""
    import ctypes

    ours = {"calibrl_seq_info": _abi.SeqInfo, "calibrl_plan_info": _abi.PlanInfo}
    assert _param_matches("const uint32_t *", ctypes.POINTER(ctypes.c_uint32), ours)
    assert not _param_matches("const uint32_t *", ctypes.POINTER(ctypes.c_uint64), ours)
    assert not _param_matches("const uint32_t *", ctypes.c_void_p, ours)
    assert _param_matches("struct calibrl_plan **", ctypes.POINTER(ctypes.c_void_p), ours)
    assert not _param_matches("struct calibrl_plan **", ctypes.c_void_p, ours)
    assert _param_matches("struct calibrl_seq_info *", ctypes.POINTER(_abi.SeqInfo), ours)
    assert not _param_matches("struct calibrl_seq_info *", ctypes.POINTER(_abi.PlanInfo), ours)
    assert not _param_matches("size_t", ctypes.c_uint32, ours)
    assert not _param_matches("uint32_t", ctypes.c_size_t, ours)
