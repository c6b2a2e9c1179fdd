"""The engine: terms, the stepper contract, step-size control, the loops, dense output and events.

Everything here sits below the solvers, gradient methods and models: it imports no solver class (steppers are
used through :class:`~neurodyn.core.stepper.Stepper`) and nothing above it but ``errors`` and ``solution``.
"""
