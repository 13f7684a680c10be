"""Small parts both sides use: signals as loop events, wake-ups, time slices, rate-limited logs."""
