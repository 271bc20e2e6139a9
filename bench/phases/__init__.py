"""
The measuring phases of a run, one module each: a server's idle sessions
(:mod:`.side`), the announcement (:mod:`.announcement`), the rate ramps
(:mod:`.ramp`), the session-open time (:mod:`.session_open`), the profile
(:mod:`.profile`) and the trigger cost (:mod:`.trigger`).
"""
