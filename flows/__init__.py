"""altforge flows: Prefect tasks and flows over pipeline/ and training/, and the CLI."""

from flows import env as _env  # noqa: F401  (sets the environment before prefect is imported)
