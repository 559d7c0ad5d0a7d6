"""xray2ct's command-line entry points (``xray2ct.cli``); the library is ``common``, the tools ``data_prep``."""
