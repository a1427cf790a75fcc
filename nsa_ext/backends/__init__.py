"""One module per backend, all with the same face:

    NAME: str
    reasons_unsupported(call, settings, facts) -> list[str]   # empty: this backend can serve it
    forward(call) -> (o [B, TQ, HQ, Dv] in q's dtype, lse [B, TQ, HQ] float32)
    backward(call, o, lse, grad_o, grad_lse) -> (dq, dk, dv)   # optional; else recomputation

`call` is a `nsa_ext.call.SelectionCall`, `settings` a `nsa_ext.config.Settings`, `facts` a
`nsa_ext.device.DeviceFacts`. No backend imports another; the dispatcher holds the priority list.
"""
