"""A logit attribution: one token's logit split by input token."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from tl_linmap.base.deprecation import renamed_fields


@renamed_fields(sources="str_tokens")
@dataclass
class LogitSplit:
    """One token's logit (through the frozen final norm) split exactly over input tokens.

    For a target other than the model's output this is the logit lens of that target, made
    linear by freezing ``ln_final`` at the inference scale of the target position.

    Attributes:
        token: The output token.
        str_tokens: The decoded input tokens.
        per_token: ``w · J_i x_i`` per input token.
        constant: The affine part: ``w · b``, the norm's offset and ``b_U``.
        logit: The logit read off the target's own value.
    """

    token: str
    str_tokens: list[str]
    per_token: Float[Tensor, " pos"]
    constant: float
    logit: float

    def total(self) -> float:
        """The sum of the parts.

        Returns:
            ``per_token.sum() + constant``, equal to `logit` to rounding.
        """
        return float(self.per_token.sum()) + self.constant
