"""Graph passes over exported video DiTs (imported as ``rehyat_compile.passes``), one per file."""
