"""What natrace knows about a traced process, independent of how it was measured.

Probes and the aggregator fill these types; views (reporters, top, exports) read them
and never talk to bcc.
"""
