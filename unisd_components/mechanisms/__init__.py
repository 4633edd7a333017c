"""The five UniSD mechanisms, one module each: its config, its component, its registration.

The tensor math of each lives beside the trainer (``unisd_components.agreement``, ``.contrastive``,
``.ema``, ``.feature_matching``, ``.divergence``) and is imported inside the hooks, so that importing a
mechanism (as the study spec does) never imports torch. See :mod:`unisd_components.registry`.
"""
