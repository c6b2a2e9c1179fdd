"""Optional integrations with other libraries' training tools.

Each submodule imports its library when it is itself imported, never before: ``import neurodyn`` imports none
of them. ``neurodyn.integrations.lightning``: a Lightning callback logging the solver's statistics (extra
``lightning``).
"""
