"""
The measuring phases of a run, one module each: a server's idle sessions
(:mod:`.side`), the announcement (:mod:`.announcement`), the rate ramps
(:mod:`.ramp`), the session-open time (:mod:`.session_open`), the profile
(:mod:`.profile`), the trigger cost (:mod:`.trigger`), and the push pipeline
(:mod:`.push`: paced pgbench commits in :mod:`.pipeline`, the commit ceiling in
:mod:`.ceiling`, isolated messages in :mod:`.isolated`).
"""
