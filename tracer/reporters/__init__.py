"""One module per output format; each renders a model Snapshot and never talks to bcc."""
