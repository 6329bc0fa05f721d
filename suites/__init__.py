"""What a task is: the LIBERO suite registry and the simulator wrapper.

Nothing here knows about models. The env wrapper (``suites.libero_env``) is imported
lazily because it pulls in MuJoCo and robosuite.
"""

from suites.registry import SUITES, SuiteSpec, TaskSpec, UnknownSuiteError, get_suite, list_suites

__all__ = ["SUITES", "SuiteSpec", "TaskSpec", "UnknownSuiteError", "get_suite", "list_suites"]
