"""Probe sets: the only code that talks to bcc. Each turns kernel data into raw figures."""
