import time, warnings, torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from dptorch import PrivacyEngine
warnings.simplefilter("ignore")
dev = torch.device("cuda")
def cnn(): return nn.Sequential(nn.Conv2d(1,16,8,2,padding=3), nn.ReLU(), nn.MaxPool2d(2,1), nn.Conv2d(16,32,4,2), nn.ReLU(), nn.MaxPool2d(2,1), nn.Flatten(), nn.Linear(512,32), nn.ReLU(), nn.Linear(32,10))
def mlp(): return nn.Sequential(nn.Linear(784,512), nn.ReLU(), nn.Linear(512,512), nn.ReLU(), nn.Linear(512,10))
for name, mk, shape in [("mlp", mlp, (784,)), ("cnn", cnn, (1,28,28))]:
    for dp in (False, True):
        torch.manual_seed(0); B = 256
        x = torch.randn(B, *shape, device=dev); y = torch.randint(0, 10, (B,), device=dev)
        model = mk().to(dev); opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if dp:
            _, opt, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.zeros(60000, 1)), batch_size=B), noise_multiplier=1.0, max_grad_norm=1.0)
        times = []
        for i in range(60):
            torch.cuda.synchronize(); t = time.perf_counter()
            opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
            torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        times = sorted(times[10:])
        print(name, "dptorch" if dp else "plain", f"{times[len(times)//2]*1000:.2f} ms")
