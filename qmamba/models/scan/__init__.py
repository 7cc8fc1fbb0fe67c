"""Selective scans, one module per way of computing the SSM recurrence (import from the modules):

    reference   the glossary of dimension letters, the recurrence, its token step and the exact
                sequential scan (the oracle; with a state function, the quantized recurrence)
    linear      the generic chunked linear recurrence with an exact backward
    mamba1      the fused Mamba1 parallel scan and ESR's end-state-only scan
    ssd         the Mamba2 chunked SSD scan
"""
