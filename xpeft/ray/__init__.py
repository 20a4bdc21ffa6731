"""The Ray pieces over the library: where Ray comes from, the profile farm (an actor pool over one bank in
the object store), Ray Train DDP fits, Ray Tune searches, the run report, and the jobs `ray_jobs/` runs."""
