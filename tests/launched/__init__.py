"""Programs the tests start through the `deepspeed` launcher (`tests.helpers.launch_module`)."""
