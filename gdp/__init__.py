"""gdp: image restoration with a Generative Diffusion Prior (Fei et al., CVPR 2023)."""

from gdp.prior.checkpoint import Prior, load_prior

__all__ = ["Prior", "load_prior", "restore", "degrade", "make_operator"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import gdp` light: torch-heavy pieces load on first use
    if name == "restore":
        from gdp.restore import restore
        return restore
    if name in ("degrade", "make_operator"):
        import gdp.operators as ops
        return getattr(ops, name)
    raise AttributeError(name)
