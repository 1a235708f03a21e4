//! PostgreSQL metadata for cluster mode (being written).
