//! NBD wire structures (filled in by the wire-codec work).
