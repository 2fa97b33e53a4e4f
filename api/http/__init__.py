"""HTTP surface: the app factory, middleware, errors, OpenAPI, the services bundle and its dependencies."""
