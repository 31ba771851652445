//! Listeners (being written).
