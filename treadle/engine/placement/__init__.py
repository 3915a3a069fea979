"""Where an engine runs: in this process, in a child process (the default of `treadle serve`), or in a Ray actor.

Every placement implements `EngineAPI` (`treadle.engine.placement.api`), so the service and the scheduler above
it never know which one they talk to.
"""
