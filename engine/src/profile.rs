//! Firmware profiles (filled in by the profile work).
