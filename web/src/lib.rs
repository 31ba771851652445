//! ringblock management plane (axum API and dashboard), see issue 6.
