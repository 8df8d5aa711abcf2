"""Run by every Python process that has tests/fault_injection on PYTHONPATH (see __init__.py):
installs the fault named by DSD_FAULT_INJECT, and does nothing without it."""

import os

if os.environ.get("DSD_FAULT_INJECT"):
    import dsd_faults

    dsd_faults.install(os.environ["DSD_FAULT_INJECT"])
