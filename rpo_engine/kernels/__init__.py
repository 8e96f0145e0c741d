"""Training kernels: fused LM-head log-probs and the clipped-ratio policy loss, with their torch references."""
from .fused_logprobs import fused_logprobs
from .policy_loss import policy_loss
from .reference import entropy_reference, logprobs_reference, loss_token_weights, policy_loss_reference

__all__ = ["fused_logprobs", "policy_loss", "logprobs_reference", "entropy_reference", "loss_token_weights",
           "policy_loss_reference"]
