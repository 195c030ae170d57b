"""The full-screen live view of `natrace top` (Textual); it reads model objects only."""
