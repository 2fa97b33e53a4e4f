"""The web console (`/ui`): a static page and its ES modules, talking to the API's public routes only."""
