"""Energy readers and the reproducibility fields of every bench report, on the CPU against fake sources: a fake
NVML module (counters in mJ, power in mW, clocks in MHz), fake sysfs trees (RAPL in uJ, INA3221 in mV/mA, cpufreq,
devfreq, nvpmodel) and fake tools. Each source's value and unit are checked, and a reader that returns nothing
never produces a figure."""
import json
import math
import time

import pytest

from cheers_deploy.bench import energy, energy_jetson
from cheers_deploy.bench import reproducibility as repro


class NVMLError(Exception):
    pass


class FakeNvml:
    """What pynvml offers, for one GPU: the energy counter advances by `mj_per_read` mJ per read; power in mW."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self, counter=True, power_mw=350_000, mj_per_read=125_000, missing=()):
        self.counter, self.power_mw, self.mj_per_read, self.missing = counter, power_mw, mj_per_read, set(missing)
        self.energy_mj, self.inits, self.shutdowns, self.fail_energy, self.fail_power = 10 ** 9, 0, 0, False, False

    def _need(self, name):
        if name in self.missing:
            raise NVMLError("Not Supported")

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        assert i == 0
        return "h0"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter or self.fail_energy:
            raise NVMLError("Not Supported")
        self.energy_mj += self.mj_per_read
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        if self.fail_power:
            raise NVMLError("Unknown Error")
        return self.power_mw

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetMaxClockInfo(self, h, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetApplicationsClock(self, h, kind):
        self._need("app")
        return 1755

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return 700_000

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return 700_000

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 650_000

    def nvmlDeviceGetPersistenceMode(self, h):
        return 1

    def nvmlDeviceGetPerformanceState(self, h):
        return 0

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x1

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._need("temperature")
        return 41


# ------------------------------------------------------------------------------------------------ NVML energy

def test_nvml_counter_mj_to_joules_and_peak_power_in_watts():
    nv = FakeNvml(power_mw=350_000, mj_per_read=125_000)
    s = energy.discover("cuda", nvml=nv)
    assert s.source == "nvml" and s.method == energy.COUNTER and "H100" in s.detail
    fig = energy.measure(s, lambda: time.sleep(0.05))
    # two counter reads around the work: +125 J between them (mJ -> J); power samples 350 W (mW -> W)
    assert fig["status"] == "ok" and fig["joules"] == pytest.approx(125.0) and fig["joules_per_unit"] == 125.0
    assert fig["peak_power_w"] == pytest.approx(350.0) and fig["seconds"] >= 0.05
    assert fig["avg_power_w"] == pytest.approx(125.0 / fig["seconds"])
    s.close()
    assert nv.shutdowns >= 1


def test_nvml_without_the_counter_integrates_power_and_says_so():
    nv = FakeNvml(counter=False, power_mw=200_000)
    s = energy.discover("cuda:0", nvml=nv)
    assert s.source == "nvml-power" and s.method == energy.INTEGRATED
    assert "nvmlDeviceGetPowerUsage integrated" in s.detail and "not used: nvml: Not Supported" in s.detail
    s.period_s = 0.005
    s.start()
    time.sleep(0.06)
    j = s.stop()
    assert j == pytest.approx(200.0 * s.elapsed_s, rel=0.1) and s.peak_w == pytest.approx(200.0)


def test_a_reader_that_returns_nothing_never_gives_a_figure():
    nv = FakeNvml()
    s = energy.NvmlEnergySampler(0, nvml=nv)
    s.start()
    nv.fail_energy = True                      # the counter read at stop fails
    assert s.stop() is None
    assert energy.energy_figures(s, None, s.elapsed_s)["status"] == "unavailable"
    nv.fail_energy, nv.mj_per_read = False, 0  # a counter that did not advance: no figure, not "0 J"
    s.start()
    assert s.stop() is None
    nv = FakeNvml(counter=False)               # one power sample in the run fails: no integral
    s = energy.NvmlPowerSampler(0, nvml=nv)
    s.period_s = 0.005
    s.start()
    nv.fail_power = True
    time.sleep(0.02)
    assert s.stop() is None
    fig = energy.measure(energy.UnavailableSampler("no source"), lambda: None)
    assert fig == {"status": "unavailable", "reason": "no source"}
    nv = FakeNvml(counter=False, power_mw=0)   # power reads, but NVML returns nothing useful: 0 W is not a figure
    s = energy.NvmlPowerSampler(0, nvml=nv)
    assert energy.measure(s, lambda: time.sleep(0.01))["status"] == "unavailable"


def test_no_nvml_gives_an_unavailable_sampler_with_reasons():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise NVMLError("NVML Shared Library Not Found")
    s = energy.discover("cuda", nvml=Broken())
    if s.source is None:                        # no Jetson rails on this machine either
        assert "nvml: NVML Shared Library Not Found" in s.detail and s.stop() is None


def test_rapl_sums_packages_and_handles_wraparound(tmp_path):
    root = tmp_path / "powercap"
    for zone, name, e0 in (("intel-rapl:0", "package-0", 999_000_000), ("intel-rapl:1", "package-1", 5_000_000),
                           ("intel-rapl:0:0", "core", 1), ("intel-rapl:2", "psys", 7)):
        (root / zone).mkdir(parents=True)
        (root / zone / "name").write_text(name + "\n")
        (root / zone / "energy_uj").write_text(f"{e0}\n")
        (root / zone / "max_energy_range_uj").write_text("1000000000\n")
    s = energy.RaplSampler(str(root))
    assert s.source == "rapl" and "package-0" in s.detail and "core" not in s.detail and "psys" not in s.detail
    s.start()
    (root / "intel-rapl:0" / "energy_uj").write_text("2000000\n")        # wrapped: 1e9 - 999e6 + 2e6 uJ = 3 J
    (root / "intel-rapl:1" / "energy_uj").write_text("6500000\n")        # + 1.5 J
    (root / "intel-rapl:0:0" / "energy_uj").write_text("900000000\n")    # a subzone: not added
    assert s.stop() == pytest.approx(4.5)
    assert s.elapsed_s > 0


def test_jetson_rails_prefer_the_module_input(tmp_path):
    hw = tmp_path / "drivers" / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    hw.mkdir(parents=True)
    for ch, label, mv, ma in ((1, "VDD_IN", 5000, 1000), (2, "VDD_CPU_GPU_CV", 5000, 400), (3, "VDD_SOC", 5000, 200)):
        (hw / f"in{ch}_label").write_text(label + "\n")
        (hw / f"in{ch}_input").write_text(f"{mv}\n")
        (hw / f"curr{ch}_input").write_text(f"{ma}\n")
    rails = dict(energy_jetson.jetson_rails(str(tmp_path / "drivers")))
    assert rails["VDD_IN"]() == pytest.approx(5.0) and rails["VDD_SOC"]() == pytest.approx(1.0)
    s = energy_jetson.JetsonRailSampler(str(tmp_path / "drivers"))
    assert s.source == "jetson-ina3221" and "VDD_IN" in s.detail and "VDD_SOC" not in s.detail
    s.period_s = 0.005
    s.start()
    import time

    time.sleep(0.05)
    j = s.stop()
    assert j == pytest.approx(5.0 * s.elapsed_s, rel=0.2)                # constant 5 W over the window


def test_tegrastats_parsing_and_integration():
    line = ("RAM 2300/7620MB (lfb 2x4MB) CPU [3%@729,1%@729] EMC_FREQ 0% GR3D_FREQ 0% cpu@45C "
            "VDD_IN 4920mW/4950mW VDD_CPU_GPU_CV 600mW/610mW VDD_SOC 1400mW/1400mW")
    assert energy_jetson.parse_tegrastats(line) == {"VDD_IN": 4.92, "VDD_CPU_GPU_CV": 0.6, "VDD_SOC": 1.4}
    assert energy_jetson.parse_tegrastats("RAM 1/2MB POM_5V_IN 3000/3000 POM_5V_GPU 100/100")["POM_5V_IN"] == 3.0
    assert energy.integrate([(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)]) == pytest.approx(11.0)
    assert energy.integrate([(0.0, 2.0)]) is None


def test_discover_never_invents_a_figure():
    for device in ("cpu", "cuda"):
        s = energy.discover(device)
        s.start()
        j = s.stop()
        s.close()
        if s.source is None:
            assert j is None and s.detail.startswith("no readable energy source")
        else:
            assert j is None or (math.isfinite(j) and j >= 0)


# ------------------------------------------------------------------------------------------------ reproducibility

def _no_tools(argv):
    return None


def test_gpu_fields_from_nvml_with_units():
    r = repro.reproducibility(root="/nonexistent", nvml=FakeNvml(missing={"temperature"}), tool=_no_tools)
    assert r["gpu_driver"] == "580.159.04" and r["cuda_driver"] == "13.0"
    (g,) = r["gpus"]
    assert g["name"] == "NVIDIA H100 80GB HBM3" and g["index"] == 0
    assert (g["sm_clock_mhz"], g["mem_clock_mhz"], g["sm_clock_max_mhz"], g["sm_app_clock_mhz"]) == (1980, 2619, 1980, 1755)
    assert g["power_limit_w"] == 700.0 and g["power_limit_enforced_w"] == 650.0 and g["power_draw_w"] == 350.0
    assert g["persistence_mode"] == "enabled" and g["performance_state"] == "P0" and g["clocks_event_reasons"] == "0x1"
    assert g["temperature_c"] == "unavailable: NVML: Not Supported"
    line = repro.summary_line(r)
    assert "SM 1980/1980 MHz" in line and "power limit 700.0 W" in line and "persistence enabled" in line
    json.dumps(r)


def test_every_field_unavailable_with_a_reason_off_gpu_and_off_jetson(tmp_path):
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise NVMLError("Driver Not Loaded")
    r = repro.reproducibility(root=str(tmp_path), nvml=Broken(), tool=_no_tools)
    for key in ("gpu_driver", "cuda_driver", "gpus"):
        assert r[key] == "unavailable: nvmlInit failed: Driver Not Loaded"
    for key in ("l4t", "nvpmodel", "jetson_clocks"):
        assert r["jetson"][key].startswith("unavailable: not a Jetson")
    assert r["cpu_governor"].startswith("unavailable: no readable cpufreq")
    assert repro.is_unavailable(r["cuda_runtime_torch"]) or isinstance(r["cuda_runtime_torch"], str)
    assert repro.summary_line(r) == "GPU state unavailable; CPU governor unavailable"


def _cpu(root, n, gov, lo, hi):
    d = root / f"sys/devices/system/cpu/cpu{n}/cpufreq"
    d.mkdir(parents=True)
    (d / "scaling_governor").write_text(gov + "\n")
    (d / "scaling_min_freq").write_text(f"{lo}\n")
    (d / "cpuinfo_max_freq").write_text(f"{hi}\n")


def _jetson(root, gpu_min, gpu_max):
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    (root / "etc/nvpmodel.conf").write_text("< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n"
                                            "< POWER_MODEL ID=2 NAME=30W >\n")
    (root / "var/lib/nvpmodel").mkdir(parents=True)
    (root / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:quiet\n")
    g = root / "sys/class/devfreq/17000000.gpu"
    g.mkdir(parents=True)
    (g / "min_freq").write_text(f"{gpu_min}\n")
    (g / "max_freq").write_text(f"{gpu_max}\n")
    (root / "sys/class/devfreq/3d00000.pcie").mkdir(parents=True)        # not the GPU: ignored


def test_jetson_power_mode_and_clocks_from_sysfs(tmp_path):
    _jetson(tmp_path, 306000000, 1020000000)
    for n in range(4):
        _cpu(tmp_path, n, "schedutil" if n < 2 else "performance", 729600, 1984000)
    r = repro.reproducibility(root=str(tmp_path), nvml=FakeNvml(), tool=_no_tools)
    j = r["jetson"]
    assert j["l4t"].startswith("# R36 (release), REVISION: 4.3")
    assert j["nvpmodel"] == {"name": "30W", "id": 2, "source": "/var/lib/nvpmodel/status"}
    assert j["jetson_clocks"]["state"] == "off" and "gpu 17000000.gpu" in j["jetson_clocks"]["evidence"]
    assert "3d00000.pcie" not in json.dumps(j)
    assert r["cpu_governor"] == "cpu0,1: schedutil, cpu2,3: performance"
    assert "nvpmodel 30W, jetson_clocks off" in repro.summary_line(r)


def test_jetson_clocks_on_and_nvpmodel_from_the_tool(tmp_path):
    _jetson(tmp_path, 1020000000, 1020000000)
    for n in range(2):
        _cpu(tmp_path, n, "performance", 1984000, 1984000)
    tool = lambda argv: "NV Power Mode: MAXN\n0\n" if argv == ["nvpmodel", "-q"] else None  # noqa: E731
    r = repro.reproducibility(root=str(tmp_path), nvml=FakeNvml(), tool=tool)
    assert r["jetson"]["nvpmodel"] == {"name": "MAXN", "id": 0, "source": "nvpmodel -q"}
    assert r["jetson"]["jetson_clocks"]["state"] == "on" and r["cpu_governor"] == "performance"
    (tmp_path / "var/lib/nvpmodel/status").unlink()            # neither the tool nor the file: unavailable
    r = repro.reproducibility(root=str(tmp_path), nvml=FakeNvml(), tool=_no_tools)
    assert r["jetson"]["nvpmodel"].startswith("unavailable: `nvpmodel -q` not runnable")


def test_the_live_machine_report_is_json_and_never_guesses():
    """Whatever this machine has: every field is a reading or "unavailable: <why>"."""
    r = repro.reproducibility()
    json.dumps(r)
    for key in ("gpu_driver", "cuda_driver", "gpus", "cpu_governor"):
        v = r[key]
        assert not isinstance(v, str) or not v.startswith("unavailable") or len(v) > len("unavailable: ")


# ------------------------------------------------------------------------------------------------ a real GPU

@pytest.mark.gpu
def test_real_nvml_energy_and_state():
    """On a CUDA machine with nvidia-ml-py: a half-second matmul loop costs a plausible number of joules, and the
    GPU's clocks and power limit are read."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("pynvml", reason="nvidia-ml-py not installed")
    s = energy.discover("cuda")
    assert s.source in ("nvml", "nvml-power"), s.detail
    a = torch.randn(4096, 4096, device="cuda")

    def work():
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            a @ a
            torch.cuda.synchronize()
    fig = energy.measure(s, work)
    s.close()
    assert fig["status"] == "ok", fig
    assert 10 < fig["avg_power_w"] < 2000 and fig["peak_power_w"] and 10 < fig["peak_power_w"] < 2000
    r = repro.reproducibility()
    g = r["gpus"][0]
    assert isinstance(g["sm_clock_max_mhz"], int) and isinstance(g["power_limit_w"], float), g
    assert not repro.is_unavailable(r["gpu_driver"]) and not repro.is_unavailable(r["cuda_driver"])
