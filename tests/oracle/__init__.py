"""Written references the tests take their truth from (see mamba_ref)."""
