"""One module per backend, all with the same face:

    NAME: str
    reasons_unsupported(call, settings, facts) -> list[str]   # empty: this backend can serve it
    auto_preferences(call, settings, facts) -> list[str]      # optional: why "auto" should take
        # another backend for a call this one can serve (length thresholds, switches); a named
        # backend ignores them, so only real incapacities belong in reasons_unsupported.
        # Both read only the call's metadata (SelectionCall.dispatch_key: shapes, strides,
        # dtypes, devices, scalar arguments), the settings and the facts, never tensor values:
        # dispatch.choose caches their answers on exactly those
    forward(call) -> (o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32)
    backward(call, grad_o, grad_lse, o=None, lse=None) -> (dq, dk, dv)
        # optional: o and lse are the forward's when kept. Without it, the dispatcher's
        # backward_backend gives the gradients to the backend GRADIENTS_BY names, else to
        # another backend's backward (packed SDPA's recomputation last).
    GRADIENTS_BY: str      # optional: the NAME of the backend that differentiates these calls

`call` is a `nsa_ext.call.SelectionCall`, `settings` a `nsa_ext.config.Settings`, `facts` a
`nsa_ext.device.DeviceFacts`. No backend imports another; the dispatcher holds the priority list.
"""
