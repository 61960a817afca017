"""What a build is asked to do: settings, the flight, its area, the resolved plan."""
