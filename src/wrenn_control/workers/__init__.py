"""Background work of the control plane: the auto-pause reaper and the start-up reconcile."""
