"""tarkit's built-in plugins, installed as the package ``tarkit_plugins`` and registered through entry points
in tarkit's pyproject.toml exactly as a third-party package registers its own."""
