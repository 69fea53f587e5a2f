"""Method presets: which terms of the MPAMatch objective each method uses, kept as data.

Every preset runs through the same trainer and the same loss library; a preset only sets weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scripts.errors import ConfigError

__all__ = ["MethodConfig", "METHOD_PRESETS", "resolve_method"]


@dataclass(frozen=True)
class MethodConfig:
    """Weights of the objective ``L = (L_x + L_u) / 2 + lambda_img L_img + lambda_txt L_txt``.

    ``L_u = weight_s1 L_s1 + weight_s2 L_s2 + weight_fp L_fp``; a method with no unsupervised term uses ``L_x`` alone.
    ``name`` is the preset it came from, for messages and logs.
    """

    name: str = "custom"
    weight_s1: float = 0.0
    weight_s2: float = 0.0
    weight_fp: float = 0.0
    lambda_img: float = 0.0
    lambda_txt: float = 0.0

    @property
    def unsupervised(self) -> bool:
        return self.weight_s1 > 0 or self.weight_s2 > 0 or self.weight_fp > 0

    @property
    def strong_views(self) -> int:
        return 2 if self.weight_s2 > 0 else (1 if self.weight_s1 > 0 else 0)

    @property
    def contrast(self) -> bool:
        return self.lambda_img > 0 or self.lambda_txt > 0


_UNIMATCH = MethodConfig(weight_s1=0.25, weight_s2=0.25, weight_fp=0.5)

METHOD_PRESETS: dict[str, MethodConfig] = {name: replace(config, name=name) for name, config in {
    "supervised": MethodConfig(),
    "fixmatch": MethodConfig(weight_s1=1.0),
    "unimatch": _UNIMATCH,
    "mpamatch_img": replace(_UNIMATCH, lambda_img=0.1),
    "mpamatch_txt": replace(_UNIMATCH, lambda_txt=0.1),
    "mpamatch": replace(_UNIMATCH, lambda_img=0.1, lambda_txt=0.1),
}.items()}


def resolve_method(method: str, lambda_img: float | None = None, lambda_txt: float | None = None) -> MethodConfig:
    """The preset named ``method`` with the contrastive weights overridden where given (config keys)."""
    if method not in METHOD_PRESETS:
        raise ConfigError(f"Unknown method '{method}' (config key 'method'); use one of {list(METHOD_PRESETS)}.")
    config = METHOD_PRESETS[method]
    overrides = {k: float(v) for k, v in (("lambda_img", lambda_img), ("lambda_txt", lambda_txt)) if v is not None}
    return replace(config, **overrides)
