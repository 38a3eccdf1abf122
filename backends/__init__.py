"""Ahead-of-time backends (imported as ``rehyat_compile.backends``), one per file."""
