"""Methods, one module per family, exported from the notebooks in nbs/methods/. Each registers itself in the registries of
`modelfusion.fusion`, whose first look-up imports every module here (nothing else names them)."""
