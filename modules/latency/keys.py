"""Platforms and block keys: one key per distinct block configuration, shared by every table and runner."""
from __future__ import annotations

ORT_PLATFORMS = ("ort_int8", "ort_fp32")
TFLITE_PLATFORMS = ("tflite_int8", "tflite_fp32")
MEASURED_PLATFORMS = ORT_PLATFORMS + TFLITE_PLATFORMS
PLATFORMS = MEASURED_PLATFORMS + ("macs",)
ACTS = ("relu", "relu6", "swish", "hswish", "none")


def block_key(cfg: dict) -> str:
    """``name_hw_cin_cout_k_e_stride_act_se``: one key per distinct block configuration."""
    e = "None" if cfg["expand"] is None else f"{float(cfg['expand']):g}"
    return (f"{cfg['name']}_{cfg['hw']}_{cfg['cin']}_{cfg['cout']}_{cfg['kernel']}_{e}_{cfg['stride']}"
            f"_{cfg['act']}_{int(bool(cfg['se']))}")


def parse_block_key(key: str) -> dict:
    """The block configuration of a :func:`block_key` (ValueError naming the key if malformed)."""
    parts = key.split("_")
    try:
        name, hw, cin, cout, k, e, stride, act, se = parts
        if act not in ACTS or se not in ("0", "1"):
            raise ValueError
        return dict(name=name, hw=int(hw), cin=int(cin), cout=int(cout), kernel=int(k),
                    expand=None if e == "None" else float(e), stride=int(stride), act=act, se=se == "1")
    except ValueError:
        raise ValueError(f"malformed block key {key!r} (expected name_hw_cin_cout_k_e_stride_act_se)") from None
