//! Transmission phase (being written).
