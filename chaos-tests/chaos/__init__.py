"""xds-relay chaos-test harness: compose projects, fault injection, invariant checks."""
