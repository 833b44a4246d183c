"""fastguide.kernels: fused kernels of the guided step and their pure-torch references.

Every fused op has a ``*_ref`` beside it that is both the runtime fallback and the test oracle.
The Triton kernels and the dispatch between backends are added on top of these references.
"""

from .reference import softmax_entropy_scale_ref

__all__ = ["softmax_entropy_scale_ref"]
