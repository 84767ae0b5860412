"""Code runner: run code in a persistent Jupyter kernel inside a capsule (template
``code-runner-beta``, kernelspec ``wrenn``), reached through the port proxy.

    from wrenn.code_runner import Capsule

    with Capsule(wait=True) as capsule:
        capsule.run_code("x = 41")
        print(capsule.run_code("x + 1").text)   # 42
"""

from wrenn.code_runner.capsule import DEFAULT_KERNEL, DEFAULT_TEMPLATE, AsyncCapsule, Capsule
from wrenn.code_runner.models import Execution, ExecutionError, Logs, Result

Sandbox = Capsule  # the published SDK's older name

__all__ = ["AsyncCapsule", "Capsule", "DEFAULT_KERNEL", "DEFAULT_TEMPLATE", "Execution", "ExecutionError", "Logs",
           "Result", "Sandbox"]
